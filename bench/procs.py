"""``loramux`` subprocesses for the benchmarks: a kernel-picked port read from uvicorn's log
line, optional CPU pinning, stopped by PID (never by name); and the machine a run was on."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_URL = re.compile(r"Uvicorn running on (http://[\d.]+:\d+)")


def cpu_facts() -> dict[str, str]:
    """The CPU model, its flags and the CPU count (every report names its machine)."""
    text = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    return {"model": model.group(1).strip() if model else "?",
            "flags": flags.group(1).strip() if flags else "?",
            "cpus": str(text.count("processor\t:"))}


class LoramuxProc:
    def __init__(self, name: str, args: list[str], log_dir: Path,
                 env: dict[str, str] | None = None, cpus: set[int] | None = None,
                 timeout: float = 300) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen([sys.executable, "-P", "-m", "loramux.cli", *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=True, preexec_fn=pin)
        self.url = self._wait_url(timeout)

    def _wait_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log_path.read_text()[-3000:])
            found = _URL.search(self.log_path.read_text(errors="replace"))
            if found:
                return found.group(1)
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.log_path} did not start in {timeout}s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
