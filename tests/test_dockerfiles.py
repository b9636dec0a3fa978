"""The Dockerfiles' own checks, without building (the images are built and run by
``make test-images``, tests/images/)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
FORBID = DOCKER / "forbid_modules.py"


def _stages(dockerfile: Path) -> list[str]:
    return re.split(r"^FROM ", dockerfile.read_text(), flags=re.M)[1:]


def test_the_no_torch_check_fails_when_torch_is_there(tmp_path):
    # This interpreter (the dev venv) has torch: the check must fail, naming it...
    proc = subprocess.run([sys.executable, "-P", str(FORBID), "torch", "json"], cwd="/",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "torch must not be in this image" in proc.stderr
    assert "json must not be in this image" in proc.stderr
    # ...and pass for modules that are not installed.
    ok = subprocess.run([sys.executable, "-P", str(FORBID), "no_such_module_here"], cwd="/",
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_the_repo_root_shadows_the_standard_library_without_safe_path():
    # Why every build stage sets PYTHONSAFEPATH: a fresh interpreter run in /src (the repo
    # root) imports the repo's operator/ folder as the standard library's `operator` (the
    # image build then failed in `python -m venv`, and `python -c 'import torch'` failed
    # whether or not torch was there). -S stands for the image's bare interpreter: here,
    # site-packages' start-up hooks import `operator` before the path is searched.
    code = "import operator; print(operator.__file__)"
    bare = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}  # make sets it
    shadowed = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, env=bare,
                              capture_output=True, text=True, timeout=60)
    assert shadowed.stdout.strip() == str(ROOT / "operator" / "__init__.py")
    safe = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**bare, "PYTHONSAFEPATH": "1"})
    assert safe.stdout.strip() != str(ROOT / "operator" / "__init__.py")
    assert "site-packages" not in safe.stdout and safe.stdout.strip().endswith("operator.py")


def test_every_build_stage_that_runs_python_in_src_is_safe_from_shadowing():
    for dockerfile in sorted(DOCKER.glob("Dockerfile.*")):
        if dockerfile.suffix == ".dockerignore":
            continue
        for stage in _stages(dockerfile):
            if "WORKDIR /src" in stage and re.search(r"\bpython3? ", stage):
                env = stage.index("PYTHONSAFEPATH=1")
                assert env < stage.index("RUN python"), dockerfile.name


def test_the_operator_image_checks_for_ml_libraries_from_a_neutral_directory():
    text = (DOCKER / "Dockerfile.operator").read_text()
    check = text.index('RUN ["/opt/loramux/bin/python", "-P", '
                       '"/usr/local/lib/loramux-build/forbid_modules.py"')
    assert text.rindex("WORKDIR /\n", 0, check) > text.rindex("WORKDIR /src", 0, check)
    assert '"torch", "transformers", "peft", "bitsandbytes"' in text
    assert "!docker/forbid_modules.py" in (DOCKER / "Dockerfile.operator.dockerignore").read_text()


def test_the_cuda_image_matches_the_cpu_image_except_for_cuda():
    """Dockerfile.inference is never built here (its base is on a registry these machines
    cannot reach); its CUDA-specific lines are checked, and its install steps must be the
    ones of the CPU image, which is built and run in every CI run."""
    cuda = (DOCKER / "Dockerfile.inference").read_text()
    cpu = (DOCKER / "Dockerfile.inference-cpu").read_text()
    assert "NEVER BUILT" in cuda
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-\S+$", cuda, re.M)
    index = re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu(\d+)$",
                      cuda, re.M)
    assert base and index, "CUDA base image and torch index must both be pinned"
    assert index.group(1) == base.group(1) + base.group(2), "torch's CUDA != the base's CUDA"
    assert "FROM ${CUDA_IMAGE}" in cuda

    def torch_version(text: str) -> str:
        match = re.search(r"^ARG TORCH_VERSION=(\S+)$", text, re.M)
        assert match
        return match.group(1)

    assert torch_version(cuda) == torch_version(cpu)
    constraints = (ROOT / "constraints.txt").read_text()
    assert f"torch=={torch_version(cpu)}" in constraints  # the torch CI tests
    for line in ("grep -v '^torch==' constraints.txt > /tmp/constraints.txt",
                 "/opt/loramux/bin/pip install -c /tmp/constraints.txt '.[serve]'",
                 "useradd --system --uid 10001", "USER 10001:10001", "PYTHONSAFEPATH=1",
                 "HF_HUB_OFFLINE=1", 'ENTRYPOINT ["loramux"]'):
        assert line in cuda and line in cpu, line
