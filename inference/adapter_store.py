"""Atomic, verified adapter downloads: the download half of the adapter-sync sidecar.

Why this exists: the inference server loads whatever it finds under
``<root>/<tenant>/<version>/``, so nothing may appear there until it is complete and proven
to be what was published. A version is fetched into a temporary directory on the same
volume (``<root>/.incoming/``), every file is checked against ``manifest.json`` (sha256 and
size), and only then is the directory renamed into place - one atomic ``rename``, so a
partial or corrupt download is never visible to the server. Every file, the manifest and the
version directory are fsynced before the rename and the parent directory after it, so a
crash (of the pod, of the node) right after a version was reported Ready cannot leave a
half-written version behind that looks complete.

A volume's disk budget (``disk_budget_bytes``) is enforced with reservations: a fetch
reserves its bytes (files and manifest) under a per-volume lock before it downloads, and
releases them once the version is installed or the fetch failed, so concurrent fetches
cannot together overshoot the budget.

The manifest is untrusted input until checked: its own sha256 must match the pin from the
desired state when one is given, its paths must stay inside the version directory, its
total size is bounded *before* anything is downloaded, and pickled weights (which execute
code when loaded) are refused unless explicitly allowed.

Sources: ``s3://bucket/prefix/`` through boto3 (endpoint, region and credentials from the
standard ``AWS_*`` environment, a mounted secret directory or explicit
:class:`~loramux.s3.S3Credentials`, so MinIO works) and ``file:///path/`` for local
directories. Everything about reaching S3 (URI and bucket rules, the client, what an S3
failure means) is :mod:`loramux.s3`; this module adds what the *content* must be.

This module must stay importable in the inference image without the operator or training
extras: no kopf, no kubernetes, nothing from ``loramux.training``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from pydantic import ValidationError

from loramux.manifest import (
    MANIFEST_FILE,
    AdapterManifest,
    UnsafePath,
    safe_relative_path,
    verify_directory,
)
from loramux.names import AdapterRef, InvalidName, validate_label
from loramux.s3 import S3Error, S3Uri, make_client, parse_s3_uri, s3_errors

INCOMING_DIR = ".incoming"
MAX_MANIFEST_BYTES = 1 << 20
CHUNK = 1 << 20

# Pickle-based checkpoints run code when loaded; the server only needs safetensors.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})

# The S3 layer's codes (loramux.s3: not_found, access_denied, io_error, bad_uri) plus what
# the content can be wrong about.
FETCH_ERROR_CODES = frozenset(
    {
        "not_found",
        "access_denied",
        "digest_mismatch",
        "too_large",
        "unsafe_manifest",
        "pickle_refused",
        "bad_manifest",
        "bad_uri",
        "io_error",
        "disk_budget",
    }
)
_RETRYABLE_BY_DEFAULT = frozenset({"io_error"})


class FetchError(S3Error):
    """A fetch that failed or was refused.

    ``code`` is one of :data:`FETCH_ERROR_CODES`; ``retryable`` says whether trying the same
    fetch again later can succeed (network and disk trouble) or not (the content is wrong,
    missing or forbidden, and retrying would only hammer the store). An
    :class:`~loramux.s3.S3Error`, so callers handle both with one ``except``.
    """

    def __init__(self, code: str, message: str, *, retryable: bool | None = None) -> None:
        if code not in FETCH_ERROR_CODES:
            raise ValueError(f"unknown FetchError code {code!r}")
        super().__init__(code, message, retryable=(code in _RETRYABLE_BY_DEFAULT
                                                   if retryable is None else retryable))

    @classmethod
    def from_s3(cls, error: S3Error) -> FetchError:
        """An S3 layer failure (bad URI, refused credentials, ...) as a fetch failure."""
        if isinstance(error, FetchError):
            return error
        code = error.code if error.code in FETCH_ERROR_CODES else "io_error"
        return cls(code, error.message, retryable=error.retryable)


@dataclass(frozen=True, slots=True)
class FetchResult:
    """A verified version on disk. ``downloaded`` is False when it was already there."""

    path: Path
    manifest: AdapterManifest
    manifest_sha256: str
    bytes: int
    seconds: float
    downloaded: bool = True


# --------------------------------------------------------------------------- sources


class _Source:
    """Where a published version's files come from."""

    uri: str

    def read_manifest(self) -> bytes:
        raise NotImplementedError

    def open_chunks(self, relative: str, size: int) -> Iterator[bytes]:
        """The bytes of ``relative``; may yield more than ``size`` (the caller bounds it)."""
        raise NotImplementedError


class _FileSource(_Source):
    def __init__(self, uri: str, directory: Path) -> None:
        self.uri = uri
        self.directory = directory

    def _path(self, relative: str) -> Path:
        path = self.directory / relative
        with _io_errors(f"{self.uri}: {relative}"):
            resolved = path.resolve()
            base = self.directory.resolve()
        if not resolved.is_relative_to(base):
            raise FetchError("unsafe_manifest", f"{self.uri}: {relative!r} resolves outside it")
        if not resolved.is_file():
            raise FetchError("not_found", f"{self.uri}: {relative} does not exist")
        return resolved

    def read_manifest(self) -> bytes:
        path = self._path(MANIFEST_FILE)
        with _io_errors(f"{self.uri}: reading {MANIFEST_FILE}"), open(path, "rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
        return data

    def open_chunks(self, relative: str, size: int) -> Iterator[bytes]:
        path = self._path(relative)
        with _io_errors(f"{self.uri}: reading {relative}"), open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                yield block


class _S3Source(_Source):
    def __init__(self, uri: str, location: S3Uri, client: Any) -> None:
        self.uri = uri
        self.location = location
        self.client = client

    def _get(self, relative: str) -> Any:
        with s3_errors(f"{self.uri}: {relative}"):
            return self.client.get_object(Bucket=self.location.bucket,
                                          Key=self.location.key(relative))

    def read_manifest(self) -> bytes:
        response = self._get(MANIFEST_FILE)
        length = response.get("ContentLength")
        with contextlib.closing(response["Body"]) as body:
            if length is not None and length > MAX_MANIFEST_BYTES:
                raise FetchError(
                    "too_large", f"{self.uri}: {MANIFEST_FILE} is {length} bytes"
                )
            with s3_errors(f"{self.uri}: reading {MANIFEST_FILE}"):
                return body.read(MAX_MANIFEST_BYTES + 1)

    def open_chunks(self, relative: str, size: int) -> Iterator[bytes]:
        response = self._get(relative)
        length = response.get("ContentLength")
        with contextlib.closing(response["Body"]) as body:
            if length is not None and length != size:
                raise FetchError(
                    "digest_mismatch",
                    f"{self.uri}: {relative} is {length} bytes, the manifest says {size}",
                )
            with s3_errors(f"{self.uri}: reading {relative}"):
                yield from body.iter_chunks(CHUNK)


def _parse_source(uri: str, s3_client: Any) -> _Source:
    if not isinstance(uri, str) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise FetchError("bad_uri", f"{str(uri)[:100]!r} is not a usable URI")
    if uri.startswith("s3://"):
        location = parse_s3_uri(uri)  # S3Error(bad_uri), made a FetchError by fetch_adapter
        return _S3Source(uri, location,
                         s3_client if s3_client is not None else make_client())
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
            raise FetchError("bad_uri", f"{uri[:100]!r}: use file:///absolute/path/")
        directory = Path(unquote(parsed.path))
        if not directory.is_absolute():
            raise FetchError("bad_uri", f"{uri[:100]!r}: the path must be absolute")
        if not directory.is_dir():
            raise FetchError("not_found", f"{uri}: no such directory")
        return _FileSource(uri, directory)
    raise FetchError("bad_uri", f"{uri[:100]!r}: only s3:// and file:// are supported")


# --------------------------------------------------------------------------- errors


@contextlib.contextmanager
def _io_errors(what: str) -> Iterator[None]:
    try:
        yield
    except FileNotFoundError as exc:
        raise FetchError("not_found", f"{what}: {exc.strerror or exc}") from exc
    except PermissionError as exc:
        raise FetchError("access_denied", f"{what}: {exc.strerror or exc}") from exc
    except OSError as exc:
        raise FetchError("io_error", f"{what}: {exc}") from exc


# --------------------------------------------------------------------------- manifest checks


def _check_manifest_paths(data: bytes, uri: str) -> None:
    """Refuse manifests whose paths escape the version directory, before the model sees them.

    The model validates paths too, but pydantic folds that into a generic validation error;
    checking here gives the refusal its own code.
    """
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FetchError("bad_manifest", f"{uri}: {MANIFEST_FILE} is not JSON: {exc}") from None
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, list):
        return  # the model reports the shape problem
    seen: set[str] = set()
    for item in files:
        name = item.get("path") if isinstance(item, dict) else None
        if not isinstance(name, str):
            continue
        try:
            safe_relative_path(name)
        except UnsafePath as exc:
            raise FetchError("unsafe_manifest", f"{uri}: {exc}") from None
        if name in seen:
            raise FetchError("unsafe_manifest", f"{uri}: {name!r} is listed twice")
        seen.add(name)
    for name in seen:
        for parent in PurePosixPath(name).parents:
            if str(parent) in seen:
                raise FetchError(
                    "unsafe_manifest", f"{uri}: {str(parent)!r} is both a file and a directory"
                )


def _parse_manifest(data: bytes, uri: str) -> AdapterManifest:
    if len(data) > MAX_MANIFEST_BYTES:
        raise FetchError("too_large", f"{uri}: {MANIFEST_FILE} exceeds {MAX_MANIFEST_BYTES} bytes")
    _check_manifest_paths(data, uri)
    try:
        return AdapterManifest.from_json(data)
    except (ValidationError, UnsafePath, InvalidName, ValueError) as exc:
        first = " ".join(str(exc).strip().splitlines()[:3])
        raise FetchError("bad_manifest", f"{uri}: invalid {MANIFEST_FILE}: {first}") from None


def _check_policy(
    manifest: AdapterManifest, ref: AdapterRef, uri: str, *, max_bytes: int, allow_pickle: bool
) -> None:
    if (manifest.tenant, manifest.version) != (ref.tenant, ref.version):
        raise FetchError(
            "bad_manifest",
            f"{uri}: the manifest is for {manifest.tenant}@{manifest.version}, wanted {ref}",
        )
    if manifest.total_bytes > max_bytes:
        raise FetchError(
            "too_large",
            f"{uri}: {ref} is {manifest.total_bytes} bytes, the limit is {max_bytes}",
        )
    if not allow_pickle:
        for entry in manifest.files:
            if PurePosixPath(entry.path).suffix.lower() in PICKLE_SUFFIXES:
                raise FetchError(
                    "pickle_refused",
                    f"{uri}: {entry.path} is a pickle-format file (refused; only safetensors)",
                )


def _digest_ok(digest: str, expected: str | None) -> bool:
    return expected is None or digest == expected.strip().lower()


# --------------------------------------------------------------------------- local store


def version_dir(ref: AdapterRef, root: Path) -> Path:
    """``<root>/<tenant>/<version>`` (names are DNS-1123 labels, so this stays inside root)."""
    return Path(root) / ref.tenant / ref.version


def _within(path: Path, root: Path) -> bool:
    resolved, base = path.resolve(), root.resolve()
    return resolved != base and resolved.is_relative_to(base)


def _verified_local(
    ref: AdapterRef,
    target: Path,
    *,
    expected_sha256: str | None,
    max_bytes: int,
    allow_pickle: bool,
) -> tuple[AdapterManifest, str] | None:
    """The installed version's manifest and digest if it is present, intact and acceptable."""
    manifest_path = target / MANIFEST_FILE
    try:
        if not manifest_path.is_file():
            return None
        data = manifest_path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if not _digest_ok(digest, expected_sha256):
            return None
        manifest = _parse_manifest(data, str(target))
        _check_policy(manifest, ref, str(target), max_bytes=max_bytes, allow_pickle=allow_pickle)
        if verify_directory(target, manifest):
            return None
    except (FetchError, OSError):
        return None
    return manifest, digest


def _discard(path: Path, incoming: Path) -> None:
    """Make ``path`` disappear atomically (rename into ``.incoming``), then delete it."""
    incoming.mkdir(parents=True, exist_ok=True)
    trash = Path(tempfile.mkdtemp(dir=incoming, prefix="discard-"))
    os.rename(path, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make ``path``'s entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_tree(top: Path) -> None:
    """fsync every directory under ``top``, deepest first, ``top`` last (files are fsynced
    as they are written)."""
    directories = [Path(d) for d, _, _ in os.walk(top)]
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        _fsync_dir(directory)


def _download(source: _Source, manifest: AdapterManifest, tmp: Path) -> int:
    base = tmp.resolve()
    total = 0
    for entry in manifest.files:
        dest = tmp / entry.path
        if not dest.resolve().is_relative_to(base):
            raise FetchError("unsafe_manifest", f"{source.uri}: {entry.path!r} escapes {tmp}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        written = 0
        with open(dest, "xb") as handle:
            for block in source.open_chunks(entry.path, entry.size):
                written += len(block)
                if written > entry.size:
                    raise FetchError(
                        "digest_mismatch",
                        f"{source.uri}: {entry.path} is longer than the manifest's "
                        f"{entry.size} bytes",
                    )
                digest.update(block)
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
        if written != entry.size or digest.hexdigest() != entry.sha256:
            raise FetchError(
                "digest_mismatch",
                f"{source.uri}: {entry.path} does not match the manifest "
                f"({written} bytes, sha256 {digest.hexdigest()[:12]}…)",
            )
        total += written
    return total


def fetch_adapter(
    ref: AdapterRef,
    uri: str,
    root: Path,
    *,
    expected_sha256: str | None = None,
    max_bytes: int,
    allow_pickle: bool = False,
    s3_client: Any = None,
    disk_budget_bytes: int | None = None,
) -> FetchResult:
    """Make ``<root>/<tenant>/<version>`` a verified copy of the version published at ``uri``.

    Idempotent: an installed version that verifies (and matches ``expected_sha256``) is
    returned without touching the source. Otherwise the version is downloaded into
    ``<root>/.incoming/``, verified, and renamed into place; on any failure the temporary
    directory is removed and the target is left as it was. Raises :class:`FetchError`
    (failures of the S3 layer included: a bad URI, refused credentials, an unreachable store).
    """
    try:
        return _fetch_adapter(ref, uri, root, expected_sha256=expected_sha256,
                              max_bytes=max_bytes, allow_pickle=allow_pickle,
                              s3_client=s3_client, disk_budget_bytes=disk_budget_bytes)
    except FetchError:
        raise
    except S3Error as exc:
        raise FetchError.from_s3(exc) from exc


def _fetch_adapter(
    ref: AdapterRef,
    uri: str,
    root: Path,
    *,
    expected_sha256: str | None,
    max_bytes: int,
    allow_pickle: bool,
    s3_client: Any,
    disk_budget_bytes: int | None,
) -> FetchResult:
    started = time.monotonic()
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive integer, not {max_bytes!r}")
    root = Path(root)
    target = version_dir(ref, root)
    checks = {"max_bytes": max_bytes, "allow_pickle": allow_pickle}

    local = _verified_local(ref, target, expected_sha256=expected_sha256, **checks)
    if local is not None:
        manifest, digest = local
        return FetchResult(
            target, manifest, digest, manifest.total_bytes, time.monotonic() - started, False
        )

    source = _parse_source(uri, s3_client)
    data = source.read_manifest()
    digest = hashlib.sha256(data).hexdigest()
    if not _digest_ok(digest, expected_sha256):
        raise FetchError(
            "digest_mismatch",
            f"{uri}: {MANIFEST_FILE} sha256 {digest} is not the expected {expected_sha256}",
        )
    manifest = _parse_manifest(data, uri)
    _check_policy(manifest, ref, uri, **checks)

    incoming = root / INCOMING_DIR
    need = manifest.total_bytes + len(data)
    with _BUDGETS.reserve(root, target, ref, need, disk_budget_bytes) as tmp:
        try:
            with _io_errors(f"{uri}: writing into {tmp}"):
                total = _download(source, manifest, tmp)
                _write_durably(tmp / MANIFEST_FILE, data)
            problems = verify_directory(tmp, manifest)
            if problems:
                raise FetchError("digest_mismatch", f"{uri}: does not verify: {problems[0]}")
            with _io_errors(f"{target}: installing"):
                _fsync_tree(tmp)  # the files are fsynced as written; now their entries
                new_parent = not target.parent.exists()
                target.parent.mkdir(parents=True, exist_ok=True)
                if not _within(target.parent, root):
                    raise FetchError("unsafe_manifest",
                                     f"{target.parent} resolves outside {root}")
                if target.exists() or target.is_symlink():
                    _discard(target, incoming)
                try:
                    os.rename(tmp, target)
                except OSError:
                    # Another fetcher may have installed the same version meanwhile.
                    local = _verified_local(ref, target, expected_sha256=digest, **checks)
                    if local is None:
                        raise
                # The rename (and a new tenant directory) durable too.
                _fsync_dir(target.parent)
                _fsync_dir(incoming)
                if new_parent:
                    _fsync_dir(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return FetchResult(target, manifest, digest, total, time.monotonic() - started, True)


@dataclass(slots=True)
class _Reservation:
    bytes: int
    tmp: Path


class _Budgets:
    """The bytes reserved by the fetches in progress, per volume (this process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_volume: dict[str, list[_Reservation]] = {}

    @contextlib.contextmanager
    def reserve(self, root: Path, target: Path, ref: AdapterRef, need: int,
                budget: int | None) -> Iterator[Path]:
        """A fresh temporary directory in ``<root>/.incoming`` for the download, with ``need``
        bytes reserved under ``budget`` until the block ends (installed or failed). Raises
        ``disk_budget`` when the bytes on the volume plus the other reservations leave no
        room. The volume is counted without ``target`` (it is replaced) and without the
        reserved downloads' directories (their reservation counts instead)."""
        incoming = root / INCOMING_DIR
        key = os.path.realpath(root)
        with self.lock:
            with _io_errors(f"{root}: preparing {INCOMING_DIR}"):
                incoming.mkdir(parents=True, exist_ok=True)
            others = self.by_volume.setdefault(key, [])
            if budget is not None:
                reserved = sum(r.bytes for r in others)
                used = _bytes_under(root, skip=[target, *(r.tmp for r in others)])
                if used + reserved + need > budget:
                    raise FetchError(
                        "disk_budget",
                        f"{ref} needs {need} bytes; {used} of the volume's budget of {budget} "
                        f"are in use and {reserved} reserved by downloads in progress (other "
                        f"versions must go first)",
                    )
            with _io_errors(f"{root}: preparing {INCOMING_DIR}"):
                tmp = Path(tempfile.mkdtemp(dir=incoming, prefix=f"{ref.tenant}-{ref.version}-"))
            mine = _Reservation(need, tmp)
            others.append(mine)
        try:
            yield tmp
        finally:
            with self.lock:
                others = self.by_volume.get(key, [])
                if mine in others:
                    others.remove(mine)
                if not others:
                    self.by_volume.pop(key, None)

    def reserved(self, root: Path) -> int:
        with self.lock:
            return sum(r.bytes for r in self.by_volume.get(os.path.realpath(root), []))


_BUDGETS = _Budgets()


def _bytes_under(root: Path, *, skip: list[Path]) -> int:
    """Bytes of every file under ``root`` (downloads in progress included), except under the
    ``skip`` directories."""
    total = 0
    skip_texts = [str(path) for path in skip]
    for directory, _, files in os.walk(root):
        if any(directory == text or directory.startswith(text + os.sep)
               for text in skip_texts):
            continue
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_size
    return total


def remove_adapter(ref: AdapterRef, root: Path) -> bool:
    """Delete ``<root>/<tenant>/<version>``; True if it existed. Never touches outside root.

    The directory is first renamed into ``.incoming`` so it disappears atomically, then
    deleted; an empty tenant directory is removed too.
    """
    root = Path(root)
    target = version_dir(ref, root)
    if not (target.exists() or target.is_symlink()):
        return False
    if target.is_symlink() or not _within(target, root):
        raise ValueError(f"{target} is a symlink or resolves outside {root}; not deleting it")
    _discard(target, root / INCOMING_DIR)
    with contextlib.suppress(OSError):
        target.parent.rmdir()
    return True


def list_local(root: Path) -> dict[AdapterRef, Path]:
    """Installed versions: ``<root>/<tenant>/<version>`` directories holding a manifest.

    Only looks; it does not verify file digests (``fetch_adapter`` does that). Skips
    ``.incoming`` and anything that is not a valid tenant/version name.
    """
    root = Path(root)
    found: dict[AdapterRef, Path] = {}
    if not root.is_dir():
        return found
    for tenant_dir in sorted(root.iterdir()):
        if tenant_dir.name.startswith(".") or not tenant_dir.is_dir() or tenant_dir.is_symlink():
            continue
        for version_path in sorted(tenant_dir.iterdir()):
            if version_path.is_symlink() or not (version_path / MANIFEST_FILE).is_file():
                continue
            try:
                validate_label(tenant_dir.name, "tenant")
                ref = AdapterRef(tenant_dir.name, version_path.name)
            except InvalidName:
                continue
            found[ref] = version_path
    return found


def purge_incoming(root: Path) -> None:
    """Delete leftovers in ``<root>/.incoming`` (a crash mid-download); call at startup."""
    incoming = Path(root) / INCOMING_DIR
    if incoming.is_dir():
        for child in incoming.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


__all__ = [
    "FETCH_ERROR_CODES",
    "INCOMING_DIR",
    "PICKLE_SUFFIXES",
    "FetchError",
    "FetchResult",
    "fetch_adapter",
    "list_local",
    "purge_incoming",
    "remove_adapter",
    "version_dir",
]
