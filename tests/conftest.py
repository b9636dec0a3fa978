"""Shared fixtures: the tiny model, adapters for it, and real server processes on loopback."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Servers in tests run in the local mode (no API keys) unless a test asks for keys with
# `--auth keys` (tests/test_access.py, tests/test_access_e2e.py); production's default is
# keys, and the chart never renders none (tests/test_chart.py).
os.environ.setdefault("LORAMUX_AUTH", "none")

from factories import make_adapter, make_tiny_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Distinct ranks and target modules on purpose: they are served side by side.
TENANTS: dict[str, tuple[int, list[str]]] = {
    "legal": (4, ["q_proj", "v_proj"]),
    "medical": (16, ALL_LINEAR),
    "finance": (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "retail": (2, ["gate_proj", "up_proj", "down_proj"]),
    "support": (32, ["v_proj", "down_proj"]),
    "travel": (12, ["k_proj", "o_proj", "up_proj"]),
}


def reference_and_batched(tiny_model_dir: Path, adapter_root: Path, **batched: object):
    """PEFT's mixed-batch backend and loramux's batched one, each on its own copy of the
    tiny model, with every tenant of TENANTS loaded: ``(reference, batched, adapters)``.
    ``batched`` are BatchedLoraBackend's keyword arguments."""
    from transformers import AutoModelForCausalLM

    from loramux.inference.adapters import BaseFacts, read_adapter
    from loramux.inference.lora_backend import BatchedLoraBackend, PeftMixedBatchBackend

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    reference = PeftMixedBatchBackend(base())
    backend = BatchedLoraBackend(base(), **batched)
    facts = BaseFacts.from_model(reference.model, ("tiny-llama",))
    adapters = {t: read_adapter(adapter_root / t / "v1", facts, max_rank=64) for t in TENANTS}
    for tenant, adapter in adapters.items():
        reference.add(tenant, adapter)
        backend.add(tenant, adapter)
    return reference, backend, adapters


def greedy_decode(backend, config, slots: list[str | None], steps: int):
    """Greedy decoding from one random prompt per row (row 0 left-padded), each row on its
    slot: ``(tokens [rows, steps + 1], logits of the prefill and of every decode step)``."""
    import torch
    from transformers import DynamicCache

    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (len(slots), 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=config)
    with torch.no_grad():
        logits = backend.forward(ids, mask, positions, cache, slots)
        tokens, all_logits = [logits.argmax(-1)], [logits]
        pos = positions[:, -1]
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones(len(slots), 1, dtype=mask.dtype)], 1)
            pos = pos + 1
            logits = backend.forward(tokens[-1][:, None], mask, pos[:, None], cache, slots)
            all_logits.append(logits)
            tokens.append(logits.argmax(-1))
    return torch.stack(tokens, 1), all_logits


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2-135M converted to safetensors (cached across runs)."""
    from loramux.inference.model_loader import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", default_model_dir)


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """``<root>/<tenant>/v1`` for every tenant in TENANTS, plus ``legal/v2``."""
    root = tmp_path_factory.mktemp("adapters")
    for seed, (tenant, (rank, targets)) in enumerate(TENANTS.items(), start=1):
        make_adapter(tiny_model_dir, root / tenant / "v1", rank=rank, targets=targets, seed=seed)
    make_adapter(tiny_model_dir, root / "legal" / "v2", rank=4, targets=["q_proj", "v_proj"],
                 seed=99)
    return root


class ServerProcess:
    """``loramux serve`` as a real process on a loopback port the kernel picks."""

    command, start_timeout = "serve", 180.0

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "loramux.cli", self.command, "--port", "0", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
        )
        self.url = self._wait_for_url(timeout=self.start_timeout)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"Uvicorn running on (http://[\d.]+:\d+)")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()[-4000:]}")
            match = pattern.search(self.log())
            if match:
                url = match.group(1)
                httpx.get(f"{url}/healthz", timeout=5).raise_for_status()
                return url
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start in {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: ``start_server(*args)`` returns a running ServerProcess, stopped at the end."""
    started: list[ServerProcess] = []
    logs = tmp_path_factory.mktemp("server-logs")

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(list(args), logs / f"server-{len(started)}.log", env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def preload_flags(adapter_root: Path, tenants: list[str], version: str = "v1") -> list[str]:
    flags: list[str] = []
    for tenant in tenants:
        flags += ["--adapter", f"{tenant}@{version}={adapter_root / tenant / version}"]
    return flags


@pytest.fixture(scope="module")
def fp32_server(start_server, tiny_model_dir: Path, adapter_root: Path) -> ServerProcess:
    """Tiny fp32 base with every tenant preloaded."""
    return start_server(
        "--model", str(tiny_model_dir), "--quantization", "none", "--max-batch-size", "16",
        "--log-format", "text", *preload_flags(adapter_root, list(TENANTS)),
    )


class SidecarProcess(ServerProcess):
    """``loramux sync`` as a real process on a loopback port the kernel picks (``--port 0``;
    the chosen port is parsed from uvicorn's "Uvicorn running on" line, as for the server)."""

    command, start_timeout = "sync", 60.0


@pytest.fixture(scope="module")
def start_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: ``start_sidecar(*args, env=...)`` returns a running SidecarProcess (the
    ``loramux sync`` CLI), stopped at the end of the module."""
    started: list[SidecarProcess] = []
    logs = tmp_path_factory.mktemp("sidecar-logs")

    def start(*args: str, env: dict[str, str] | None = None) -> SidecarProcess:
        sidecar = SidecarProcess(list(args), logs / f"sidecar-{len(started)}.log", env)
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.stop()


# Kubernetes harness fixtures (tests/k8s_harness.py): the emulated API server `k8s`, the real
# kubectl/helm binaries `k8s_binaries`, moto `s3_server`, and `operator_factory`.
from k8s_harness import k8s, k8s_binaries, operator_factory, s3_server  # noqa: E402, F401
