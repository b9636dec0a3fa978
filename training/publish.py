"""Publish an adapter version to S3 (``loramux push``).

A published version is a prefix ``s3://bucket/.../<tenant>/<version>/`` holding the adapter
files and ``manifest.json``. The manifest is written last, so a reader that can see it can
also see every file it lists; its sha256 is the version's pin (``source.sha256`` in the
``LoraAdapter`` resource). A version is immutable by default: re-pushing identical bytes is a
no-op, anything else is refused unless forced, because a running fleet may already have
loaded the old content under the same name.

Works against AWS S3 and S3-compatible stores (MinIO, moto): the client is
:func:`loramux.s3.make_client`, so the standard ``AWS_*`` environment
(``AWS_ENDPOINT_URL[_S3]``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, credentials, profiles)
applies. URI and bucket rules, the client and the meaning of S3 errors are
:mod:`loramux.s3`'s, shared with every reader; reading a version back is the sidecar's
verified downloader, :func:`loramux.inference.adapter_store.fetch_adapter`.
"""

from __future__ import annotations

import contextlib
import hashlib
import mimetypes
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from loramux.manifest import (
    MANIFEST_FILE,
    AdapterManifest,
    UnsafePath,
    describe_files,
    verify_directory,
)
from loramux.names import DNS1123_LABEL_MAX, InvalidName, validate_label
from loramux.s3 import S3Error, classify, is_missing_key, make_client, s3_errors
from loramux.s3 import parse_s3_uri as parse_any_s3_uri

API_VERSION = "loramux.io/v1alpha1"
KIND = "LoraAdapter"
DEFAULT_POOL: dict[str, Any] = {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}}
SHA256_METADATA_KEY = "sha256"  # stored as x-amz-meta-sha256

# Pickle-based checkpoints execute code when loaded; the serving fleet only loads safetensors,
# so publishing one would either be useless or, worse, a foothold for whoever wrote it.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})


class PublishError(Exception):
    """A push that cannot (or must not) go ahead; the message is one readable line."""


@dataclass(frozen=True, slots=True)
class S3Location:
    """A parsed ``s3://bucket/prefix/<tenant>/<version>/`` URI."""

    bucket: str
    prefix: str  # key prefix without a trailing slash, ending in "<tenant>/<version>"
    tenant: str
    version: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/"

    def key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}"

    @property
    def manifest_key(self) -> str:
        return self.key(MANIFEST_FILE)


@dataclass(frozen=True, slots=True)
class PushResult:
    """What ``push`` did. ``files``/``bytes`` describe the version (the manifest's files).

    ``skipped`` is True when the identical version was already published and nothing was
    uploaded; ``replaced`` is True when a different, existing version was overwritten (force).
    """

    uri: str
    manifest_sha256: str
    files: int
    bytes: int
    skipped: bool
    replaced: bool = False
    manifest: AdapterManifest | None = None


def parse_s3_uri(uri: str, manifest: AdapterManifest | None = None) -> S3Location:
    """Parse and validate ``s3://bucket/[prefix/]<tenant>/<version>[/]``.

    The S3 rules (scheme, bucket name, path segments) are :func:`loramux.s3.parse_s3_uri`'s.
    The last two segments must be the tenant and version, so the object layout alone says
    what a version is; with ``manifest`` they must also match the manifest being pushed,
    which catches pushing tenant A's adapter under tenant B's path.
    """
    try:
        location = parse_any_s3_uri(uri)
    except S3Error as exc:
        raise PublishError(exc.message) from None
    segments = location.segments
    if len(segments) < 2:
        raise PublishError(
            f"{uri!r} must end in <tenant>/<version>/ "
            f"(e.g. s3://{location.bucket}/adapters/acme/v1/)"
        )
    tenant, version = segments[-2], segments[-1]
    try:
        validate_label(tenant, "tenant (second-to-last URI segment)")
        validate_label(version, "version (last URI segment)")
    except InvalidName as exc:
        raise PublishError(f"{uri!r}: {exc}") from None
    if manifest is not None and (manifest.tenant, manifest.version) != (tenant, version):
        raise PublishError(
            f"{uri!r} names {tenant}@{version} but the manifest is for "
            f"{manifest.tenant}@{manifest.version}"
        )
    return S3Location(bucket=location.bucket, prefix=location.prefix, tenant=tenant,
                      version=version)


def describe_s3_error(exc: BaseException) -> str:
    """One line for a botocore/boto3 error: the S3 error code and message, no traceback."""
    return classify(exc).message


@contextlib.contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    """S3 failures (missing bucket, denied, no credentials, unreachable) as one line."""
    try:
        with s3_errors(what):
            yield
    except S3Error as exc:
        raise PublishError(exc.message) from exc


def _get_object_bytes(client: Any, bucket: str, key: str) -> bytes | None:
    """The object's bytes, or None if the key does not exist (a missing bucket still raises)."""
    try:
        response = client.get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if is_missing_key(exc):
            return None
        raise
    with contextlib.closing(response["Body"]) as body:
        return body.read()


def _content_type(path: str) -> str:
    if path.endswith(".json"):
        return "application/json"
    guessed, _ = mimetypes.guess_type(path)
    return guessed or "application/octet-stream"


def load_local_manifest(directory: Path) -> tuple[AdapterManifest, bytes]:
    """Read ``<dir>/manifest.json`` and check the directory against it.

    Refuses anything that would publish a version readers cannot verify or should not load:
    a missing/invalid manifest, files that differ from it, files it does not list, and
    pickled weights.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PublishError(f"{directory}: not a directory")
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise PublishError(f"{directory}: no {MANIFEST_FILE} (write one before pushing)")
    data = manifest_path.read_bytes()
    try:
        manifest = AdapterManifest.from_json(data)
    except (ValidationError, UnsafePath, InvalidName) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(first[:3]) if first else type(exc).__name__
        raise PublishError(f"{manifest_path}: invalid manifest: {detail}") from None
    pickled = [f.path for f in manifest.files if Path(f.path).suffix.lower() in PICKLE_SUFFIXES]
    pickled += [
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
    ]
    if pickled:
        raise PublishError(
            f"{directory}: refusing to publish pickled weights "
            f"({', '.join(sorted(set(pickled)))}); "
            "save the adapter as safetensors (save_pretrained(..., safe_serialization=True))"
        )
    problems = verify_directory(directory, manifest)
    listed = {f.path for f in manifest.files}
    try:
        extra = [f.path for f in describe_files(directory) if f.path not in listed]
    except UnsafePath as exc:
        raise PublishError(f"{directory}: {exc}") from None
    problems += [f"{path}: not listed in the manifest" for path in extra]
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise PublishError(
            f"{directory} does not match its {MANIFEST_FILE} ({shown}); regenerate the manifest"
        )
    return manifest, data


def push(
    directory: Path,
    uri: str,
    *,
    force: bool = False,
    client: Any = None,
    progress: bool = True,
) -> PushResult:
    """Upload a verified adapter directory to ``uri``; ``manifest.json`` goes last.

    Identical content already at ``uri`` is a no-op; different content is refused unless
    ``force``. When forcing, the old manifest is deleted first, so during the overwrite a
    reader sees "not published" rather than an old manifest over new files.
    """
    from tqdm.auto import tqdm

    directory = Path(directory)
    manifest, manifest_bytes = load_local_manifest(directory)
    location = parse_s3_uri(uri, manifest)
    manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    total = manifest.total_bytes
    where = location.uri
    if client is None:
        with _s3_errors(where):
            client = make_client()

    with _s3_errors(f"{where}: cannot read the existing manifest"):
        existing = _get_object_bytes(client, location.bucket, location.manifest_key)
    if existing is not None:
        if existing == manifest_bytes:
            return PushResult(
                where, manifest_sha256, len(manifest.files), total, skipped=True, manifest=manifest
            )
        if not force:
            old = hashlib.sha256(existing).hexdigest()
            raise PublishError(
                f"{where} is already published with different content (manifest sha256 "
                f"{old[:12]}…, pushing {manifest_sha256[:12]}…); versions are immutable, push a "
                "new version or pass --force to overwrite"
            )
        with _s3_errors(f"{where}: cannot remove the old manifest"):
            client.delete_object(Bucket=location.bucket, Key=location.manifest_key)

    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"{manifest.tenant}@{manifest.version}",
        disable=not progress,
        leave=False,
    ) as bar:
        for entry in manifest.files:
            key = location.key(entry.path)
            with _s3_errors(f"{where}: uploading {entry.path}"):
                client.upload_file(
                    str(directory / entry.path),
                    location.bucket,
                    key,
                    ExtraArgs={
                        "ContentType": _content_type(entry.path),
                        "Metadata": {SHA256_METADATA_KEY: entry.sha256},
                    },
                    Callback=bar.update,
                )
    # The manifest is uploaded from the very bytes that were verified above, and last.
    with _s3_errors(f"{where}: uploading {MANIFEST_FILE}"):
        client.put_object(
            Bucket=location.bucket,
            Key=location.manifest_key,
            Body=manifest_bytes,
            ContentType="application/json",
            Metadata={SHA256_METADATA_KEY: manifest_sha256},
        )
    return PushResult(
        where,
        manifest_sha256,
        len(manifest.files),
        total,
        skipped=False,
        replaced=existing is not None,
        manifest=manifest,
    )


def cr_name(tenant: str, version: str) -> str:
    """``<tenant>-<version>`` as a DNS-1123 label; over-long names keep a hash suffix so two
    long versions of one tenant never collapse into one resource name."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{tenant}-{version}".lower()).strip("-") or "adapter"
    if len(name) > DNS1123_LABEL_MAX:
        digest = hashlib.sha256(f"{tenant}@{version}".encode()).hexdigest()[:8]
        name = name[: DNS1123_LABEL_MAX - 9].rstrip("-") + "-" + digest
    return validate_label(name, "resource name")


def render_cr(
    manifest: AdapterManifest,
    uri: str,
    manifest_sha256: str,
    *,
    name: str | None = None,
    namespace: str | None = None,
    pool: dict[str, Any] | None = None,
) -> str:
    """The ``LoraAdapter`` resource that pins this published version, as YAML.

    ``pool`` is a label selector for the inference pool that should serve it; the default
    selects the chart's inference deployment.
    """
    location = parse_s3_uri(uri, manifest)
    metadata: dict[str, Any] = {
        "name": cr_name(manifest.tenant, manifest.version)
        if name is None
        else validate_label(name, "resource name")
    }
    if namespace:
        metadata["namespace"] = validate_label(namespace, "namespace")
    document = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "tenant": manifest.tenant,
            "version": manifest.version,
            "baseModel": manifest.base_model,
            "source": {"uri": location.uri, "sha256": manifest_sha256},
            "pool": pool if pool is not None else DEFAULT_POOL,
        },
    }
    return yaml.safe_dump(document, sort_keys=False)
