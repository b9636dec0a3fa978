"""Two operator replicas with kopf peering: only the higher priority one reconciles; the
other stands by, and takes over once the leader is gone. Real `loramux operator` processes
against the kmock emulator (with kopf's peering resources) and a real kubectl."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from k8s_harness import CRD_PATH, OperatorProcess, start_k8s

LORA = ("loramux.io/v1alpha1", "loraadapters")
pytestmark = pytest.mark.timeout(240)


def _cr(name: str, tenant: str) -> str:
    return json.dumps({
        "apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"tenant": tenant, "version": "v1", "baseModel": "tiny-llama",
                 "source": {"uri": "s3://bucket/x/"},
                 "pool": {"matchLabels": {"app.kubernetes.io/name": "loramux-inference"}}}})


def _wait(fn, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_standby_replica_stays_out_until_the_leader_dies(tmp_path: Path) -> None:
    k8s = start_k8s(tmp_path, kubectl=True, kopf_peering=True)
    try:
        assert k8s.kubectl is not None
        k8s.kubectl.apply(CRD_PATH)
        k8s.kubectl.apply(json.dumps({"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                                      "metadata": {"name": "loramux",
                                                   "namespace": "default"}}))

        def replica(name: str, priority: int) -> OperatorProcess:
            proc = OperatorProcess(k8s.kubeconfig, tmp_path / f"{name}.log", [
                "--namespace", "default", "--peering", "loramux", "--priority", str(priority),
                "--peering-lifetime-seconds", "4", "--resync-seconds", "1",
                "--health-port", "0", "--log-level", "debug"])
            proc.start()
            proc.wait_for_log("loramux operator started", 60)
            return proc

        low, high = replica("low", 100), replica("high", 200)
        try:
            k8s.kubectl.apply(_cr("first", "legal"))
            # no pool pods here: the leader reports it (phase Pending, reason NoPods)
            _wait(lambda: (k8s.api.find(*LORA, "first") or {}).get("status", {}).get("phase"),
                  "status of the first CR")
            low.wait_for_log("standing by", 30)
            assert "standing by" not in high.log()
            stood_by = low.log().count("standing by")

            high.stop(kill=True)  # no goodbye: its peering entry has to expire
            k8s.kubectl.apply(_cr("second", "medical"))
            _wait(lambda: (k8s.api.find(*LORA, "second") or {}).get("status", {}).get("phase"),
                  "the standby took over", timeout=60)
            # the only live replica did it; it had been standing by until then
            assert stood_by >= 1
        finally:
            low.stop()
            high.stop()
    finally:
        k8s.server.stop()
