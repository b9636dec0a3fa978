"""The adapter manifest: what a published adapter version contains, verifiable file by file.

``manifest.json`` sits beside the adapter files. It lists every file with its sha256 and
size, and what the adapter was made from. A reader verifies a downloaded version against
it; the digest of ``manifest.json`` itself (``source.sha256`` in a ``LoraAdapter``) pins
the whole version. Torch-free: the sidecar and the operator use it too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loramux import __version__
from loramux.names import TenantName, VersionName

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
_HEX64 = r"^[0-9a-f]{64}$"


class UnsafePath(ValueError):
    """A manifest entry that would escape its version directory."""


def safe_relative_path(name: str) -> str:
    """Return ``name`` if it is a plain relative POSIX path inside the directory."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or "\\" in name or any(p in ("..", "") for p in path.parts):
        raise UnsafePath(f"manifest path {name!r} is not a plain relative path")
    if name != str(path) or name == MANIFEST_FILE:
        raise UnsafePath(f"manifest path {name!r} is not allowed")
    return name


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str = Field(pattern=_HEX64)
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _safe(cls, value: str) -> str:
        return safe_relative_path(value)


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION
    tenant: TenantName
    version: VersionName
    base_model: str = Field(min_length=1)
    rank: int = Field(ge=1)
    lora_alpha: float
    target_modules: list[str] | str
    files: list[ManifestFile] = Field(min_length=1)
    training_data_sha256: str | None = Field(None, pattern=_HEX64)
    loramux_version: str = __version__
    created_at: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        """The canonical bytes written to ``manifest.json`` (stable key order)."""
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> AdapterManifest:
        return cls.model_validate_json(data)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(directory: Path) -> list[ManifestFile]:
    """Every regular file under ``directory`` except the manifest, sorted by path."""
    files = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST_FILE:
            continue
        files.append(ManifestFile(path=rel, sha256=sha256_file(path), size=path.stat().st_size))
    return files


def write_manifest(directory: Path, manifest: AdapterManifest) -> str:
    """Write ``manifest.json``; return its sha256 (the version's pin)."""
    data = manifest.to_json()
    (directory / MANIFEST_FILE).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def verify_directory(directory: Path, manifest: AdapterManifest) -> list[str]:
    """Problems found checking ``directory`` against ``manifest``; empty means verified."""
    problems: list[str] = []
    for entry in manifest.files:
        path = directory / entry.path
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"{entry.path}: size {size}, manifest says {entry.size}")
            continue
        if sha256_file(path) != entry.sha256:
            problems.append(f"{entry.path}: sha256 does not match the manifest")
    return problems
