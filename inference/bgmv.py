"""Build and load loramux's CPU decode kernel (``bgmv_cpu.cpp``, the op ``loramux::bgmv_``).

torch has no op that multiplies each row by a different matrix picked by an index without
first copying the picked matrices out (``index_select`` then ``bmm``), and on a CPU that copy
is most of a distinct-tenant decode step's LoRA cost (docs/benchmarks.md, "A kernel that
reads each row's adapter in place"). Punica's and vLLM's BGMV kernels do this on GPUs only;
vLLM's CPU backend uses the same plain-torch gather as our fallback. So this one op is
written by hand, and everything else stays in torch.

The library is compiled once per machine with the compiler torch's own extension builder
finds (``torch.utils.cpp_extension.load``, ninja), into ``LORAMUX_KERNEL_DIR``
(default ``~/.cache/loramux/kernels``), named by a hash of the source, the flags and the
torch version, and loaded from there by later processes without a compiler. ``make setup``
builds it; the CPU image ships it prebuilt. Where it cannot be built (no compiler, an
unusual CPU) the server logs why and runs the plain-torch path: slower, same results up to
rounding.

Flags: ``-O3 -ffp-contract=fast`` and, on x86 CPUs with AVX2 and FMA,
``-march=x86-64-v3`` (not ``native``: a library built on an AVX-512 machine must also load on
an AVX2-only one, and this op is bound by memory, not by vector width).

    python -m loramux.inference.bgmv   # build (or find) the library and print its path
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .precision import cpu_info

log = logging.getLogger("loramux.kernel")

SOURCE = Path(__file__).with_name("bgmv_cpu.cpp")
ENV_DIR = "LORAMUX_KERNEL_DIR"  # the server's --kernel-dir, for `python -m` here

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                   torch.Tensor], None]

_lock = threading.Lock()
_loaded: tuple[Kernel | None, str] | None = None


def kernel_dir(directory: Path | None = None) -> Path:
    if directory is not None:
        return directory
    return Path(os.environ.get(ENV_DIR) or Path.home() / ".cache" / "loramux" / "kernels")


def build_flags() -> list[str]:
    flags = ["-O3", "-ffp-contract=fast"]  # a * b + c as one FMA where the CPU has it
    if platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= cpu_info().flags:
        flags.append("-march=x86-64-v3")
    return flags


def library_name() -> str:
    """The library's name: changes with the source, the flags and the torch build, so a
    stale build is never loaded."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join(build_flags()).encode())
    digest.update(torch.__version__.encode())
    digest.update(f"{sys.version_info.major}.{sys.version_info.minor}".encode())
    digest.update(b"cpp_extension.load")  # how it is built (an inline build pulled in pybind)
    return f"loramux_bgmv_{digest.hexdigest()[:16]}"


def _op() -> Kernel:
    return torch.ops.loramux.bgmv_


def build(directory: Path | None = None) -> Path:
    """Compile the library into ``directory`` (default :func:`kernel_dir`) unless it is
    there already; return its path. Raises on any build failure. A build also loads the op
    into this process (torch's builder does), so callers must not load the file again."""
    from torch.utils.cpp_extension import load as load_extension

    name = library_name()
    directory = kernel_dir(directory)
    path = directory / f"{name}.so"
    if path.exists():
        return path
    work = directory / f"{name}.build"
    work.mkdir(parents=True, exist_ok=True)
    _ninja_on_path()
    log.info("building the CPU LoRA kernel (once per machine)", extra={"path": str(path)})
    # the file as it is: load_inline would prepend <torch/extension.h>, which needs Python's
    # headers (absent from a Debian python3 without python3-dev, as in the image's build)
    load_extension(name, sources=[str(SOURCE)], extra_cflags=build_flags(),
                   build_directory=str(work), is_python_module=False, verbose=False)
    built = work / f"{name}.so"
    tmp = directory / f".{name}.{os.getpid()}.so"
    tmp.write_bytes(built.read_bytes())
    tmp.replace(path)  # atomic: concurrent builders each write a whole file
    return path


def built(directory: Path | None = None) -> bool:
    """Whether this machine's library is in ``directory`` (loading it takes milliseconds)."""
    return (kernel_dir(directory) / f"{library_name()}.so").exists()


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package's binary sits in the venv's
    bin folder, which is not on PATH when the venv's python is run without activating it
    (make, the image build, a service unit)."""
    try:
        import ninja
    except ImportError:
        return  # a system ninja may still be on PATH
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR


def load(directory: Path | None = None, allow_build: bool = True) -> tuple[Kernel | None, str]:
    """``(op, reason)``: the kernel, or None and why not. Builds it into ``directory`` (see
    :func:`kernel_dir`) if it is not there; loads at most once per process (a failure is
    kept too: a second try would fail the same way)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load(directory, allow_build)
            op, reason = _loaded
            (log.info if op is not None else log.warning)(
                "CPU LoRA kernel: %s", reason, extra={"kernel": op is not None})
        return _loaded


def _load(directory: Path | None, allow_build: bool) -> tuple[Kernel | None, str]:
    if hasattr(torch.ops, "loramux") and hasattr(torch.ops.loramux, "bgmv_"):
        return _op(), "loaded"
    path = kernel_dir(directory) / f"{library_name()}.so"
    try:
        if not path.exists():
            if not allow_build:
                return None, f"not built ({path} missing)"
            path = build(directory)  # loads the op too
        else:
            torch.ops.load_library(str(path))
        return _op(), f"loaded {path.name}"
    except Exception as exc:  # no compiler or ninja, a broken toolchain, a corrupt file
        return None, f"unavailable ({_why(exc)}); plain torch instead"


def _why(exc: Exception) -> str:
    """The line of a failed build that says what went wrong (the compiler's first error),
    not the command line torch's message starts with."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]  # the compiler's style
    line = (errors or lines or [""])[0]
    return f"{type(exc).__name__}: {line[:300]}"


def main() -> None:
    from loramux.logs import configure_logging

    configure_logging("info", "text")
    op, reason = load()
    print(reason)
    if op is None:
        raise SystemExit(1)
    print(kernel_dir() / f"{library_name()}.so")


if __name__ == "__main__":
    main()
