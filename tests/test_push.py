"""``loramux push`` against real S3 over HTTP (moto's server on loopback).

The wire matters here: ordering of uploads, metadata, error codes for missing buckets and
the client built from ``AWS_*`` environment variables are all things an in-process mock
would paper over.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
import yaml
from safetensors.torch import save_file

from loramux.inference.adapter_store import FetchError, fetch_adapter
from loramux.manifest import (
    MANIFEST_FILE,
    AdapterManifest,
    describe_files,
    verify_directory,
    write_manifest,
)
from loramux.names import AdapterRef
from loramux.training import cli_push
from loramux.training.publish import (
    PublishError,
    cr_name,
    parse_s3_uri,
    push,
    render_cr,
)

BUCKET = "adapters"
BASE = "HuggingFaceTB/SmolLM2-135M"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    # moto serves from threads of this process: its request log (werkzeug, INFO) would land
    # on the stderr of the in-process CLI runs below, which a real `loramux push` never has.
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        werkzeug.setLevel(level)


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A client on the moto server, the AWS env pointing at it, and a fresh bucket."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=BUCKET)
    yield client
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def make_adapter_dir(
    root: Path, tenant: str = "acme", version: str = "v1", seed: int = 0, rank: int = 4
) -> tuple[Path, str]:
    """A small PEFT-shaped adapter directory with its manifest; returns (dir, manifest sha)."""
    directory = root / f"{tenant}-{version}-{seed}"
    directory.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": BASE,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(
            rank, 64, generator=gen
        ),
        "base_model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(
            64, rank, generator=gen
        ),
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    manifest = AdapterManifest(
        tenant=tenant,
        version=version,
        base_model=BASE,
        rank=rank,
        lora_alpha=2.0 * rank,
        target_modules=["q_proj", "v_proj"],
        files=describe_files(directory),
    )
    return directory, write_manifest(directory, manifest)


def uri(tenant: str = "acme", version: str = "v1") -> str:
    return f"s3://{BUCKET}/team/adapters/{tenant}/{version}/"


def fetch(
    location: str, root: Path, client: Any, *, expected_sha256: str | None = None
) -> tuple[Path, AdapterManifest]:
    """Read a pushed version back with the production downloader (the sidecar's and
    ``loramux fetch``'s): ``<root>/<tenant>/<version>/`` and its manifest."""
    tenant, version = location.rstrip("/").split("/")[-2:]
    result = fetch_adapter(AdapterRef(tenant, version), location, root,
                           expected_sha256=expected_sha256, max_bytes=1 << 30,
                           s3_client=client)
    return result.path, result.manifest


def record_puts(client: Any) -> list[str]:
    """Keys of every PutObject/CreateMultipartUpload the client sends, in order."""
    keys: list[str] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        keys.append(params["Key"])

    client.meta.events.register("before-parameter-build.s3.PutObject", hook)
    client.meta.events.register("before-parameter-build.s3.CreateMultipartUpload", hook)
    return keys


def test_push_then_fetch_round_trips_byte_for_byte(s3: Any, tmp_path: Path) -> None:
    directory, sha = make_adapter_dir(tmp_path)
    result = push(directory, uri(), client=s3, progress=False)
    assert not result.skipped and not result.replaced
    assert result.manifest_sha256 == sha
    assert result.uri == uri()
    assert result.files == 2
    manifest = AdapterManifest.from_json((directory / MANIFEST_FILE).read_bytes())
    assert result.bytes == manifest.total_bytes

    head = s3.head_object(Bucket=BUCKET, Key="team/adapters/acme/v1/adapter_model.safetensors")
    assert head["Metadata"]["sha256"] == manifest.files[1].sha256
    head = s3.head_object(Bucket=BUCKET, Key="team/adapters/acme/v1/manifest.json")
    assert head["ContentType"] == "application/json"
    assert head["Metadata"]["sha256"] == sha

    dest, fetched = fetch(uri(), tmp_path / "fetched", s3, expected_sha256=sha)
    assert fetched == manifest
    for name in ("adapter_config.json", "adapter_model.safetensors", MANIFEST_FILE):
        assert (dest / name).read_bytes() == (directory / name).read_bytes()
    assert verify_directory(dest, fetched) == []


def test_push_uses_the_aws_environment_when_no_client_is_given(s3: Any, tmp_path: Path) -> None:
    directory, sha = make_adapter_dir(tmp_path)
    result = push(directory, uri(), progress=False)  # boto3.client("s3") from AWS_* env
    assert result.manifest_sha256 == sha
    body = s3.get_object(Bucket=BUCKET, Key="team/adapters/acme/v1/manifest.json")["Body"]
    assert body.read() == (directory / MANIFEST_FILE).read_bytes()


def test_manifest_is_uploaded_last(s3: Any, tmp_path: Path) -> None:
    directory, _ = make_adapter_dir(tmp_path)
    (directory / "zz_extra.json").write_text("{}")  # sorts after manifest.json
    manifest = AdapterManifest.from_json((directory / MANIFEST_FILE).read_bytes())
    write_manifest(directory, manifest.model_copy(update={"files": describe_files(directory)}))
    keys = record_puts(s3)
    push(directory, uri(), client=s3, progress=False)
    prefix = "team/adapters/acme/v1/"
    assert keys[-1] == prefix + MANIFEST_FILE
    assert sorted(keys[:-1]) == [
        prefix + n for n in ("adapter_config.json", "adapter_model.safetensors", "zz_extra.json")
    ]


def test_pushing_identical_content_again_is_a_no_op(s3: Any, tmp_path: Path) -> None:
    directory, sha = make_adapter_dir(tmp_path)
    push(directory, uri(), client=s3, progress=False)
    keys = record_puts(s3)
    again = push(directory, uri(), client=s3, progress=False)
    assert again.skipped and again.manifest_sha256 == sha
    assert keys == []


def test_different_content_is_refused_unless_forced(s3: Any, tmp_path: Path) -> None:
    first, first_sha = make_adapter_dir(tmp_path, seed=1)
    second, second_sha = make_adapter_dir(tmp_path, seed=2)
    assert first_sha != second_sha
    push(first, uri(), client=s3, progress=False)

    with pytest.raises(PublishError, match="already published with different content"):
        push(second, uri(), client=s3, progress=False)
    fetch(uri(), tmp_path / "still-first", s3, expected_sha256=first_sha)  # untouched

    result = push(second, uri(), client=s3, force=True, progress=False)
    assert result.replaced and not result.skipped and result.manifest_sha256 == second_sha
    dest, _ = fetch(uri(), tmp_path / "now-second", s3, expected_sha256=second_sha)
    assert (dest / "adapter_model.safetensors").read_bytes() == (
        second / "adapter_model.safetensors"
    ).read_bytes()


def test_directory_that_does_not_match_its_manifest_is_refused(s3: Any, tmp_path: Path) -> None:
    directory, _ = make_adapter_dir(tmp_path)
    (directory / "adapter_config.json").write_text('{"r": 99}')
    keys = record_puts(s3)
    with pytest.raises(PublishError, match=r"does not match its manifest\.json"):
        push(directory, uri(), client=s3, progress=False)
    assert keys == []

    other, _ = make_adapter_dir(tmp_path, seed=5)
    (other / "notes.txt").write_text("unlisted")
    with pytest.raises(PublishError, match="not listed in the manifest"):
        push(other, uri(), client=s3, progress=False)

    missing = tmp_path / "no-manifest"
    missing.mkdir()
    with pytest.raises(PublishError, match=r"no manifest\.json"):
        push(missing, uri(), client=s3, progress=False)


def test_pickled_weights_are_refused(s3: Any, tmp_path: Path) -> None:
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "adapter_config.json").write_text("{}")
    torch.save({"w": torch.zeros(2)}, directory / "adapter_model.bin")
    manifest = AdapterManifest(
        tenant="acme",
        version="v1",
        base_model=BASE,
        rank=4,
        lora_alpha=8,
        target_modules="all-linear",
        files=describe_files(directory),
    )
    write_manifest(directory, manifest)
    with pytest.raises(PublishError, match=r"pickled weights \(adapter_model.bin\)"):
        push(directory, uri(), client=s3, progress=False)


@pytest.mark.parametrize(
    ("bad_uri", "message"),
    [
        ("https://adapters/acme/v1/", "not an s3:// URI"),
        ("adapters/acme/v1", "not an s3:// URI"),
        ("s3://Adapters/acme/v1/", "not a valid S3 bucket name"),
        ("s3://ab/acme/v1/", "not a valid S3 bucket name"),
        ("s3://a..b/acme/v1/", "bad '.' placement"),
        ("s3://192.168.1.1/acme/v1/", "IP address"),
        ("s3://adapters/v1/", "must end in <tenant>/<version>/"),
        ("s3://adapters/", "must end in <tenant>/<version>/"),
        ("s3://adapters/x//acme/v1/", "empty"),
        ("s3://adapters/../acme/v1/", "'..'"),
        ("s3://adapters/Acme/v1/", "not a DNS-1123 label"),
        ("s3://adapters/acme/v1.0/", "not a DNS-1123 label"),
        ("s3://adapters/acme/v1/?x=1", "query strings"),
    ],
)
def test_uri_validation(bad_uri: str, message: str) -> None:
    with pytest.raises(PublishError, match=message.replace(".", r"\.").replace("?", r"\?")):
        parse_s3_uri(bad_uri)


def test_parse_s3_uri_accepts_with_and_without_prefix() -> None:
    loc = parse_s3_uri("s3://my.bucket-1/a/b/acme/v2")
    assert (loc.bucket, loc.prefix, loc.tenant, loc.version) == (
        "my.bucket-1",
        "a/b/acme/v2",
        "acme",
        "v2",
    )
    assert loc.uri == "s3://my.bucket-1/a/b/acme/v2/"
    assert parse_s3_uri("s3://bkt/acme/v2/").manifest_key == "acme/v2/manifest.json"


def test_uri_must_match_the_manifest(s3: Any, tmp_path: Path) -> None:
    directory, _ = make_adapter_dir(tmp_path)
    with pytest.raises(PublishError, match="names globex@v1 but the manifest is for acme@v1"):
        push(directory, uri("globex", "v1"), client=s3, progress=False)
    with pytest.raises(PublishError, match="names acme@v2 but the manifest is for acme@v1"):
        push(directory, uri("acme", "v2"), client=s3, progress=False)


def test_missing_bucket_is_a_clear_error(s3: Any, tmp_path: Path) -> None:
    directory, _ = make_adapter_dir(tmp_path)
    with pytest.raises(PublishError, match="NoSuchBucket"):
        push(directory, "s3://no-such-bucket/acme/v1/", client=s3, progress=False)
    with pytest.raises(FetchError, match=r"manifest\.json") as info:  # not published
        fetch(uri("acme", "v9"), tmp_path / "x", s3)
    assert info.value.code == "not_found"


def test_fetch_refuses_manifest_paths_that_escape(s3: Any, tmp_path: Path) -> None:
    evil = {
        "schema_version": 1,
        "tenant": "acme",
        "version": "v1",
        "base_model": BASE,
        "rank": 4,
        "lora_alpha": 8.0,
        "target_modules": "all-linear",
        "training_data_sha256": None,
        "loramux_version": "0.1.0",
        "created_at": None,
        "files": [{"path": "../escape.txt", "sha256": "0" * 64, "size": 1}],
    }
    s3.put_object(
        Bucket=BUCKET, Key="team/adapters/acme/v1/manifest.json", Body=json.dumps(evil).encode()
    )
    with pytest.raises(FetchError, match=r"escape\.txt") as info:  # an invalid manifest
        fetch(uri(), tmp_path / "dest", s3)
    assert info.value.code == "unsafe_manifest"
    assert not (tmp_path / "escape.txt").exists()


def test_render_cr_defaults_and_overrides(tmp_path: Path) -> None:
    directory, sha = make_adapter_dir(tmp_path)
    manifest = AdapterManifest.from_json((directory / MANIFEST_FILE).read_bytes())
    doc = yaml.safe_load(
        render_cr(manifest, uri(), sha, namespace="ml", pool={"matchLabels": {"pool": "gpu-a"}})
    )
    assert doc["apiVersion"] == "loramux.io/v1alpha1" and doc["kind"] == "LoraAdapter"
    assert doc["metadata"] == {"name": "acme-v1", "namespace": "ml"}
    assert doc["spec"]["pool"] == {"matchLabels": {"pool": "gpu-a"}}
    long = cr_name("t" * 40, "v" * 40)
    assert len(long) <= 63 and long != cr_name("t" * 40, "v" * 39 + "w")


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli_push.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_emit_cr_prints_only_yaml_on_stdout(
    s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, sha = make_adapter_dir(tmp_path)
    code, out, err = run_cli([str(directory), uri(), "--emit-cr", "--namespace", "tenants"], capsys)
    assert code == 0, err
    doc = yaml.safe_load(out)
    assert doc["apiVersion"] == "loramux.io/v1alpha1" and doc["kind"] == "LoraAdapter"
    assert doc["metadata"] == {"name": "acme-v1", "namespace": "tenants"}
    spec = doc["spec"]
    assert (spec["tenant"], spec["version"], spec["baseModel"]) == ("acme", "v1", BASE)
    assert spec["source"] == {"uri": uri(), "sha256": sha}
    assert sha == hashlib.sha256((directory / MANIFEST_FILE).read_bytes()).hexdigest()
    assert spec["pool"] == {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}}
    assert "published" in err and sha in err

    code, out, err = run_cli([str(directory), uri(), "--emit-cr"], capsys)
    assert code == 0 and "already published" in err
    assert yaml.safe_load(out)["spec"]["source"]["sha256"] == sha


def assert_one_line_error(code: int, out: str, err: str, needle: str) -> None:
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("loramux push: error: "), err
    assert needle in err, err


def test_cli_errors_are_one_line_exit_2(
    s3: Any,
    s3_endpoint: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first, _ = make_adapter_dir(tmp_path, seed=1)
    second, _ = make_adapter_dir(tmp_path, seed=2)
    assert run_cli([str(first), uri()], capsys)[0] == 0

    assert_one_line_error(*run_cli([str(second), uri()], capsys), "--force")
    assert run_cli([str(second), uri(), "--force"], capsys)[0] == 0
    assert_one_line_error(
        *run_cli([str(first), "s3://no-such-bucket/acme/v1/"], capsys), "NoSuchBucket"
    )
    assert_one_line_error(
        *run_cli([str(first), "s3://adapters/globex/v1/"], capsys), "manifest is for acme@v1"
    )
    assert_one_line_error(
        *run_cli([str(first), "gs://adapters/acme/v1/"], capsys), "not an s3:// URI"
    )
    assert_one_line_error(*run_cli([str(tmp_path / "nope"), uri()], capsys), "not a directory")

    # Wrong credentials: moto rejects nothing by default, so point at a closed port instead
    # for "unreachable", and drop credentials entirely for "no credentials".
    assert_one_line_error(
        *run_cli([str(first), uri(), "--endpoint-url", "http://127.0.0.1:9"], capsys),
        "EndpointConnectionError",
    )
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert_one_line_error(*run_cli([str(first), uri()], capsys), "NoCredentialsError")


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli([], capsys)
    assert code == 2 and "usage: loramux push" in err and "Traceback" not in err


def test_s3_errors_are_described_in_one_line() -> None:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    from loramux.training.publish import describe_s3_error

    denied = ClientError(
        {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject"
    )
    assert describe_s3_error(denied) == "AccessDenied: Access Denied"
    try:
        raise S3UploadFailedError("Failed to upload x to b/k: long text") from denied
    except S3UploadFailedError as wrapped:
        assert describe_s3_error(wrapped) == "AccessDenied: Access Denied"
    bare = ClientError({"Error": {"Code": "403", "Message": ""}}, "HeadObject")
    assert describe_s3_error(bare) == "403: access denied"


def test_cli_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "usage: loramux push" in out
    for flag in ("--force", "--emit-cr", "--endpoint-url", "--namespace", "--name",
                 "--no-progress"):
        assert flag in out
