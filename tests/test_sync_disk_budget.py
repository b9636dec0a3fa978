"""The adapter volume's disk budget: a version that does not fit fails with `disk_budget`
(nothing written), the others are unaffected, and it arrives once space is freed. Real
`loramux serve` and `loramux sync` processes, file:// sources."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from factories import stage_adapter
from loramux.inference.adapter_store import FetchError, fetch_adapter
from loramux.names import AdapterRef


def _publish(adapter_root: Path, out: Path, tenant: str) -> tuple[str, int]:
    src, _ = stage_adapter(adapter_root, out, tenant, "v1")
    size = sum(p.stat().st_size for p in src.iterdir() if p.name != "manifest.json")
    return src.as_uri() + "/", size


def test_store_refuses_a_version_over_budget(adapter_root: Path, tmp_path: Path) -> None:
    uri, size = _publish(adapter_root, tmp_path / "pub", "legal")
    root = tmp_path / "volume"
    with pytest.raises(FetchError) as err:
        fetch_adapter(AdapterRef("legal", "v1"), uri, root, max_bytes=1 << 30,
                      disk_budget_bytes=size - 1)
    assert err.value.code == "disk_budget" and not err.value.retryable
    assert not (root / "legal").exists()
    done = fetch_adapter(AdapterRef("legal", "v1"), uri, root, max_bytes=1 << 30,
                         disk_budget_bytes=size + 4096)  # + the manifest
    assert done.downloaded


def test_sidecar_over_budget_fails_alone_then_fits(start_server, start_sidecar,
                                                   tiny_model_dir: Path, adapter_root: Path,
                                                   tmp_path: Path) -> None:
    published = {t: _publish(adapter_root, tmp_path / "pub", t) for t in ("legal", "medical")}
    room_for_one = max(size for _, size in published.values()) + 8192
    server = start_server("--model", str(tiny_model_dir), "--quantization", "none",
                          "--log-format", "text")
    sidecar = start_sidecar("--root", str(tmp_path / "volume"), "--server-url", server.url,
                            "--resync-seconds", "0.3", "--disk-budget-bytes", str(room_for_one))

    def put(tenants: list[str]) -> None:
        r = httpx.put(f"{sidecar.url}/v1/desired", timeout=5, json={"adapters": [
            {"tenant": t, "version": "v1", "uri": published[t][0]} for t in tenants]})
        assert r.status_code == 202, r.text

    def phases() -> dict[str, Any]:
        items = httpx.get(f"{sidecar.url}/v1/state", timeout=5).json()["adapters"]
        return {a["tenant"]: a for a in items}

    def wait(predicate, what: str) -> None:
        deadline = time.monotonic() + 30
        while not predicate():
            assert time.monotonic() < deadline, (what, phases())
            time.sleep(0.1)

    put(["legal"])
    wait(lambda: phases().get("legal", {}).get("phase") == "Ready", "legal ready")
    put(["legal", "medical"])
    wait(lambda: phases().get("medical", {}).get("code") == "disk_budget", "medical refused")
    assert phases()["legal"]["phase"] == "Ready"
    assert "budget" in phases()["medical"]["reason"]
    assert not (tmp_path / "volume" / "medical").exists()
    metrics = httpx.get(f"{sidecar.url}/metrics", timeout=5).text
    assert 'loramux_sync_fetch_failures_total{code="disk_budget"}' in metrics
    # legal goes: its files are deleted, and medical fits without a new PUT for it
    put(["medical"])
    wait(lambda: phases().get("medical", {}).get("phase") == "Ready", "medical ready")
    assert not (tmp_path / "volume" / "legal").exists()
