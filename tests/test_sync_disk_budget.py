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


def test_concurrent_fetches_cannot_overshoot_the_budget(adapter_root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Two fetches at once, each of which fits alone but not both: the bytes are reserved
    before the download, so the second fails with disk_budget while the first is still
    downloading, and the volume never holds more than the budget. A failed fetch releases
    its reservation."""
    import os
    import threading

    import loramux.inference.adapter_store as store

    published = {t: _publish(adapter_root, tmp_path / "pub", t) for t in ("legal", "medical")}
    manifest_room = 4096
    budget = max(size for _, size in published.values()) + manifest_room  # room for one
    root = tmp_path / "volume"
    downloading, release = threading.Event(), threading.Event()
    real_download = store._download
    peak = [0]

    def volume_bytes() -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root)
                   for f in fs)

    def slow_download(source: Any, manifest: Any, tmp: Path) -> int:
        total = real_download(source, manifest, tmp)
        downloading.set()  # the files are written; hold here until the other fetch ran
        assert release.wait(30)
        return total

    def fetch(tenant: str) -> Any:
        return fetch_adapter(AdapterRef(tenant, "v1"), published[tenant][0], root,
                             max_bytes=1 << 30, disk_budget_bytes=budget)

    monkeypatch.setattr(store, "_download", slow_download)
    outcome: dict[str, Any] = {}
    first = threading.Thread(target=lambda: outcome.setdefault("legal", fetch("legal")))
    first.start()
    try:
        assert downloading.wait(30)
        peak[0] = max(peak[0], volume_bytes())
        assert store._BUDGETS.reserved(root) > 0
        monkeypatch.setattr(store, "_download", real_download)
        with pytest.raises(FetchError) as err:
            fetch("medical")  # would fit if only finished versions were counted
        assert err.value.code == "disk_budget", err.value
        assert "reserved" in err.value.message
        assert not (root / "medical").exists()
    finally:
        release.set()
        first.join(30)
    assert outcome["legal"].downloaded
    peak[0] = max(peak[0], volume_bytes())
    assert peak[0] <= budget, (peak[0], budget)
    assert store._BUDGETS.reserved(root) == 0  # released on completion

    # A failure releases its reservation too: a fetch that dies mid-download leaves room.
    from loramux.inference.adapter_store import remove_adapter

    remove_adapter(AdapterRef("legal", "v1"), root)

    def broken(source: Any, manifest: Any, tmp: Path) -> int:
        raise FetchError("io_error", "the store went away")

    monkeypatch.setattr(store, "_download", broken)
    with pytest.raises(FetchError) as err:
        fetch("legal")
    assert err.value.code == "io_error"
    assert store._BUDGETS.reserved(root) == 0
    monkeypatch.setattr(store, "_download", real_download)
    assert fetch("medical").downloaded
    assert volume_bytes() <= budget
