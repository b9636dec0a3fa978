"""`loramux fetch` (the dedicated pod's init container) as a real process: verified download,
digest pin, clear refusals with exit status 2 and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from loramux.manifest import AdapterManifest, describe_files, write_manifest


def _publish(directory: Path) -> str:
    import torch

    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    save_file({"base_model.model.q_proj.lora_A.weight": torch.ones(4, 16)},
              str(directory / "adapter_model.safetensors"))
    manifest = AdapterManifest(tenant="legal", version="v1", base_model="tiny", rank=4,
                               lora_alpha=8.0, target_modules=["q_proj"],
                               files=describe_files(directory))
    return write_manifest(directory, manifest)


def _fetch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "loramux.cli", "fetch", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def source(tmp_path: Path) -> tuple[Path, str]:
    directory = tmp_path / "published" / "legal" / "v1"
    return directory, _publish(directory)


def test_fetch_lands_verified_version(source: tuple[Path, str], tmp_path: Path) -> None:
    directory, digest = source
    root = tmp_path / "adapters"
    done = _fetch("--root", str(root), "--tenant", "legal", "--version", "v1",
                  "--uri", directory.as_uri() + "/", "--sha256", digest)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["digest"] == digest and summary["downloaded"] is True
    installed = root / "legal" / "v1" / "adapter_model.safetensors"
    assert installed.read_bytes() == (directory / "adapter_model.safetensors").read_bytes()
    # a second run is a no-op on the verified copy
    again = _fetch("--root", str(root), "--tenant", "legal", "--version", "v1",
                   "--uri", directory.as_uri() + "/")
    assert again.returncode == 0 and json.loads(again.stdout)["downloaded"] is False


def test_refusals_exit_2_with_a_reason(source: tuple[Path, str], tmp_path: Path) -> None:
    directory, _ = source
    root = tmp_path / "adapters"
    uri = directory.as_uri() + "/"
    wrong_pin = _fetch("--root", str(root), "--tenant", "legal", "--version", "v1",
                       "--uri", uri, "--sha256", "b" * 64, "--retries", "0")
    assert wrong_pin.returncode == 2
    assert "digest_mismatch" in wrong_pin.stderr and "Traceback" not in wrong_pin.stderr
    assert not (root / "legal" / "v1").exists()

    weights = directory / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    corrupt = _fetch("--root", str(root), "--tenant", "legal", "--version", "v1",
                     "--uri", uri, "--retries", "0")
    assert corrupt.returncode == 2 and "Traceback" not in corrupt.stderr
    assert not (root / "legal" / "v1").exists()

    bad_name = _fetch("--root", str(root), "--tenant", "../etc", "--version", "v1",
                      "--uri", uri)
    assert bad_name.returncode == 2 and "tenant" in bad_name.stderr
    assert "Traceback" not in bad_name.stderr

    missing = _fetch("--root", str(root), "--tenant", "legal", "--version", "v1",
                     "--uri", (tmp_path / "nowhere").as_uri() + "/", "--retries", "0")
    assert missing.returncode == 2 and "not_found" in missing.stderr


def test_not_found_is_retried_like_in_the_sidecar(tmp_path: Path) -> None:
    """One retry policy for every download: a missing version may be an upload still under
    way (the manifest comes last), so not_found is retried before giving up."""
    root = tmp_path / "adapters"
    missing = _fetch("--root", str(root), "--tenant", "legal", "--version", "v1",
                     "--uri", (tmp_path / "nowhere").as_uri() + "/", "--retries", "2",
                     "--backoff-seconds", "0")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    retries = [json.loads(line) for line in missing.stderr.splitlines()
               if line.startswith("{") and "retrying" in line]
    assert [(r["code"], r["attempt"]) for r in retries] == [("not_found", 1), ("not_found", 2)]
    assert missing.stderr.splitlines()[-1].startswith("loramux fetch: legal@v1 failed: not_found")
    assert not (root / "legal" / "v1").exists()


def test_help_exits_0() -> None:
    done = _fetch("--help")
    assert done.returncode == 0 and "--s3-credentials-dir" in done.stdout
