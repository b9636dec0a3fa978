"""The images, built and run: what the chart runs, as the chart runs it.

``make test-images`` builds ``loramux/operator:ci`` and ``loramux/inference-cpu:ci`` with
``docker/build-images.sh`` (podman when there is no Docker engine, a base bootstrapped from
Debian packages when no registry answers), then runs this module. Run alone, the module
builds them itself (layers are cached, so a rebuild of unchanged sources takes seconds).

Every container runs on the host network bound to loopback, with ``--init`` and ``--rm``, as
user 10001 with a read-only root filesystem and a tmpfs on /tmp (the chart's
securityContext and emptyDirs), and is removed in a ``finally``, also when a test fails.
What cannot exist here: a kubelet. The emulated API server (kmock) holds a Pod object whose
podIP is 127.0.0.1 and whose ports are the containers' ports, as in tests/test_operator_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from factories import make_adapter, stage_adapter
from k8s_harness import S3, K8s, free_port, pod_manifest, pod_status

ROOT = Path(__file__).resolve().parents[2]
TAG = os.environ.get("LORAMUX_IMAGE_TAG", "ci")
OPERATOR = f"loramux/operator:{TAG}"
INFERENCE = f"loramux/inference-cpu:{TAG}"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
CRD_PATH = ROOT / "crds" / "loraadapter.yaml"
TIMINGS: dict[str, float] = {}


def _engine() -> str:
    forced = os.environ.get("CONTAINER_ENGINE")
    if forced:
        return forced
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True,
                                                 timeout=20).returncode == 0:
        return "docker"
    return "podman"


ENGINE = _engine()


def _engine_env() -> dict[str, str]:
    from loramux.inference.model_loader import default_cache_dir

    cache = Path(os.environ.get("LORAMUX_IMAGE_CACHE", default_cache_dir() / "images"))
    env = dict(os.environ)
    if ENGINE == "podman" and (cache / "containers.conf").is_file():
        env["CONTAINERS_CONF"] = str(cache / "containers.conf")
    return env


def run_engine(*args: str, timeout: float = 120, check: bool = True
               ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout,
                          env=_engine_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{ENGINE} {' '.join(args[:6])}... failed:\n{proc.stderr[-3000:]}")
    return proc


def _image_exists(ref: str) -> bool:
    return run_engine("image", "inspect", ref, check=False).returncode == 0


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """Both images, built by docker/build-images.sh unless they exist already."""
    if not (_image_exists(OPERATOR) and _image_exists(INFERENCE)):
        started = time.monotonic()
        proc = subprocess.run([str(ROOT / "docker" / "build-images.sh")], capture_output=True,
                              text=True, timeout=3600,
                              env={**os.environ, "LORAMUX_IMAGE_TAG": TAG})
        assert proc.returncode == 0, proc.stderr[-5000:]
        TIMINGS["build_s"] = time.monotonic() - started
    return {"operator": OPERATOR, "inference": INFERENCE}


class Container:
    """``<engine> run -d`` as the chart runs the images; ``stop()`` removes it."""

    def __init__(self, image: str, args: list[str], *, env: dict[str, str] | None = None,
                 volumes: list[str] | None = None, tmpfs: list[str] | None = None,
                 entrypoint: str | None = None):
        self.name = f"loramux-test-{uuid.uuid4().hex[:10]}"
        cmd = ["run", "-d", "--rm", "--init", "--network", "host", "--name", self.name,
               "--user", "10001:10001", "--read-only", "--tmpfs", "/tmp:rw,mode=1777"]
        for path in tmpfs or []:
            cmd += ["--tmpfs", f"{path}:rw,mode=1777"]
        for volume in volumes or []:
            cmd += ["--volume", volume]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        if entrypoint:
            cmd += ["--entrypoint", entrypoint]
        self.started = time.monotonic()
        run_engine(*cmd, image, *args)

    def logs(self) -> str:
        proc = run_engine("logs", self.name, check=False)
        return proc.stdout + proc.stderr

    def exec(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_engine("exec", self.name, *args, check=False)

    def running(self) -> bool:
        proc = run_engine("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return proc.stdout.strip() == "true"

    def wait_http(self, url: str, timeout: float = 300) -> float:
        """Seconds from ``run`` until ``url`` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=5).status_code == 200:
                    return time.monotonic() - self.started
            if not self.running():
                raise AssertionError(f"{self.name} exited:\n{self.logs()[-4000:]}")
            time.sleep(0.5)
        raise AssertionError(f"{url} not ready in {timeout}s:\n{self.logs()[-4000:]}")

    def stop(self) -> None:
        run_engine("rm", "-f", "-t", "5", self.name, check=False, timeout=60)


@contextlib.contextmanager
def container(image: str, args: list[str], **kwargs: Any) -> Iterator[Container]:
    c = Container(image, args, **kwargs)
    try:
        yield c
    except BaseException:
        print(f"--- {c.name} log:\n{c.logs()[-6000:]}")
        raise
    finally:
        c.stop()


def shared_dir(prefix: str, mode: int = 0o755) -> Path:
    """A host directory the container user (10001) can read (or, 0o777, write)."""
    path = Path(tempfile.mkdtemp(prefix=f"loramux-{prefix}-"))
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def smol_adapter(default_model_dir: Path) -> Iterator[Path]:
    """``<root>/legal/v1``: a rank-8 adapter for the embedded SmolLM2, world-readable."""
    root = shared_dir("adapters")
    try:
        make_adapter(default_model_dir, root / "legal" / "v1", rank=8,
                     targets=["q_proj", "v_proj"], seed=3, scale=0.02, base_name=SMOL)
        for path in root.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def serve_args(port: int) -> list[str]:
    return ["serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
            "--log-format", "text", "--auth", "none"]


def test_both_images_run_as_non_root_on_a_read_only_root(images: dict[str, str]) -> None:
    for image in images.values():
        with container(image, ["-c", "import time; time.sleep(600)"],
                       entrypoint="python") as c:
            assert c.exec("id", "-u").stdout.strip() == "10001"
            denied = c.exec("touch", "/opt/loramux/x")
            assert denied.returncode != 0 and "Read-only file system" in denied.stderr
            assert c.exec("touch", "/tmp/x").returncode == 0  # the chart's emptyDir


def test_operator_image_has_no_ml_libraries_and_the_check_can_fail(
        images: dict[str, str]) -> None:
    probe = ("import importlib.util as u, sys; "
             "sys.exit(sum(u.find_spec(m) is not None for m in sys.argv[1:]))")
    libs = ["torch", "transformers", "peft", "bitsandbytes"]
    for image, expected in ((images["operator"], 0), (images["inference"], 4)):
        proc = run_engine("run", "--rm", "--network", "host", "--workdir", "/",
                          "--entrypoint", "python", image, "-P", "-c", probe, *libs,
                          check=False)
        assert proc.returncode == expected, (image, proc.stderr)
    # No build tools in the final stage either.
    tools = run_engine("run", "--rm", "--network", "host", "--entrypoint", "sh",
                       images["operator"], "-c", "command -v gcc cc make g++", check=False)
    assert tools.returncode != 0 and not tools.stdout.strip(), tools.stdout
    size = int(run_engine("image", "inspect", "--format", "{{.Size}}", images["operator"])
               .stdout.strip())
    assert size < 600 * 1024**2, size  # no torch, no build tools: a few hundred MB


def test_inference_image_serves_the_embedded_model_and_hot_loads_an_adapter(
        images: dict[str, str], smol_adapter: Path) -> None:
    port = free_port()
    with container(images["inference"], serve_args(port),
                   env={"LORAMUX_CACHE_DIR": "/var/cache/loramux"},
                   tmpfs=["/var/cache/loramux"],
                   volumes=[f"{smol_adapter}:/adapters:ro"]) as server:
        url = f"http://127.0.0.1:{port}"
        TIMINGS["inference_ready_s"] = server.wait_http(f"{url}/readyz")
        models = httpx.get(f"{url}/v1/models").json()
        assert models["base_model"] == "SmolLM2-135M-Instruct"
        assert models["precision"]["device"] == "cpu"
        # the CPU kernel was built into the image: loaded at start, no compiler at run time
        assert models["lora_kernel"]["state"] == "kernel", models["lora_kernel"]
        r = httpx.put(f"{url}/admin/adapters/legal/v1",
                      json={"path": "/adapters/legal/v1", "activate": True}, timeout=120)
        assert r.status_code == 200, r.text
        r = httpx.post(f"{url}/generate", timeout=120, json={
            "tenant_id": "legal", "prompt": "Draft a clause", "max_new_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.json()["adapter"] == "legal@v1" and r.json()["usage"]["completion_tokens"] > 0
        base = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is",
            "max_tokens": 4, "temperature": 0})
        assert base.status_code == 200 and "Paris" in base.json()["choices"][0]["text"]


def test_sidecar_and_operator_images_place_an_adapter_from_s3(
        images: dict[str, str], smol_adapter: Path, k8s: K8s, s3_server: S3,
        tmp_path: Path) -> None:
    """The operator container reconciles a LoraAdapter applied with kubectl; the sidecar
    container pulls it from moto's S3 into a volume; the server container loads it from
    there and serves it."""
    from loramux.training.publish import push

    s3_server.create_bucket("images")
    staged, digest = stage_adapter(smol_adapter, tmp_path / "staging", "legal", "v1",
                                   base_model=SMOL)
    uri = "s3://images/pub/legal/v1/"
    push(staged, uri, client=s3_server.client, progress=False)
    assert k8s.kubectl is not None
    k8s.kubectl.apply(CRD_PATH)
    volume = shared_dir("volume", 0o777)
    server_port, sync_port = free_port(), free_port()
    aws = {k: v for k, v in s3_server.env.items()}
    kubeconfig = shared_dir("kube") / "config"
    shutil.copy(k8s.kubeconfig, kubeconfig)
    kubeconfig.chmod(0o644)
    try:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(container(
                images["inference"], [*serve_args(server_port), "--adapter-root", "/adapters"],
                env={"LORAMUX_CACHE_DIR": "/var/cache/loramux"},
                tmpfs=["/var/cache/loramux"], volumes=[f"{volume}:/adapters:ro"]))
            sidecar = stack.enter_context(container(
                images["inference"],
                ["sync", "--root", "/adapters", "--port", str(sync_port), "--host", "127.0.0.1",
                 "--server-url", f"http://127.0.0.1:{server_port}", "--resync-seconds", "1"],
                env=aws, volumes=[f"{volume}:/adapters"]))
            TIMINGS["sidecar_ready_s"] = sidecar.wait_http(
                f"http://127.0.0.1:{sync_port}/healthz", 120)
            server.wait_http(f"http://127.0.0.1:{server_port}/readyz")
            k8s.api.create(pod_manifest("pool-0", server_port, sync_port))
            k8s.api.patch_status("v1", "pods", "pool-0", pod_status())
            operator = stack.enter_context(container(
                images["operator"],
                ["operator", "--namespace", "default", "--resync-seconds", "2",
                 "--health-port", "0"],
                env={"KUBECONFIG": "/kube/config"}, volumes=[f"{kubeconfig.parent}:/kube:ro"]))
            lora = {"apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
                    "metadata": {"name": "legal", "namespace": "default"},
                    "spec": {"tenant": "legal", "version": "v1", "baseModel": SMOL,
                             "source": {"uri": uri, "sha256": digest},
                             "pool": {"matchLabels": {
                                 "app.kubernetes.io/name": "loramux-inference"}}}}
            applied = time.monotonic()
            k8s.kubectl("apply", "-f", "-", input=json.dumps(lora))
            status = _wait(lambda: _ready(k8s), "LoraAdapter Ready", 180,
                           lambda: operator.logs()[-3000:] + sidecar.logs()[-3000:])
            TIMINGS["apply_to_ready_s"] = time.monotonic() - applied
            assert status["placements"][0]["digest"] == digest
            assert (volume / "legal" / "v1" / "adapter_model.safetensors").is_file()
            r = httpx.post(f"http://127.0.0.1:{server_port}/generate", timeout=120,
                           json={"tenant_id": "legal", "prompt": "Draft", "max_new_tokens": 4})
            assert r.status_code == 200 and r.json()["adapter"] == "legal@v1", r.text
            assert "Traceback" not in operator.logs()
    finally:
        shutil.rmtree(volume, ignore_errors=True)
        shutil.rmtree(kubeconfig.parent, ignore_errors=True)
    print(f"image timings: {json.dumps({k: round(v, 1) for k, v in TIMINGS.items()})}")


def _ready(k8s: K8s) -> dict[str, Any] | None:
    obj = k8s.api.find("loramux.io/v1alpha1", "loraadapters", "legal")
    status = (obj or {}).get("status") or {}
    rows = status.get("placements") or []
    if status.get("phase") == "Ready" and rows and rows[0].get("state") == "Ready":
        return status
    return None


def _wait(fn: Any, what: str, timeout: float, context: Any) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = fn()
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last {last!r}\n{context()}")


def test_secrets_reach_the_sidecar_only_through_its_environment(images: dict[str, str]) -> None:
    """The S3 credentials the chart gives the sidecar are not baked into either image."""
    for image in images.values():
        env = json.loads(run_engine("image", "inspect", "--format", "{{json .Config.Env}}",
                                    image).stdout)
        assert not any(e.startswith(("AWS_", "LORAMUX_ADMIN_TOKEN")) for e in env), env
        assert any(e == "PYTHONSAFEPATH=1" for e in env), env


def _leftovers() -> list[str]:
    out = run_engine("ps", "-a", "--filter", "name=loramux-test-", "--format", "{{.Names}}")
    return [line for line in out.stdout.split() if line]


def test_a_failing_test_still_removes_its_container(images: dict[str, str]) -> None:
    name = None
    with pytest.raises(RuntimeError, match="boom"), \
            container(images["operator"], ["-c", "import time; time.sleep(600)"],
                      entrypoint="python") as c:
        name = c.name
        assert c.running()
        raise RuntimeError("boom")
    assert name is not None
    assert run_engine("inspect", name, check=False).returncode != 0


def test_no_container_is_left_behind() -> None:
    assert _leftovers() == []
