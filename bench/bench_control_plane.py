"""A control plane that keeps up (issue 17): 1,000 LoraAdapters x 20 pool pods.

Real parts: kmock's emulated API server (tests/k8s_harness.py, in its own process, so that
its work is not charged to the operator), the real ``loramux operator`` process (kopf), and
20 Pod objects (podIP 127.0.0.1) whose sidecar port is a *stand-in sidecar*: a small HTTP
server in this process that answers the real contract with the real pydantic models:

- ``PUT /v1/desired`` (a ``DesiredState``): remembered; every version in it is "held" at
  once (a stand-in downloads nothing; it counts a version it did not hold as a download, a
  version it held before, dropped and is sent again as a *re-download*, and a held version
  left out as a drop);
- ``GET /v1/state``: a ``SyncState`` reporting every desired version ``Ready`` with a
  matching server ``AdapterList`` (each version ready on the device, active as desired,
  base model ``tiny-llama``).

Measured:

  cold start     LoraAdapters created (``replicas: 1``, spread by ``leastAdapters``), then
                 the operator starts: time until every LoraAdapter is ``Ready`` (polled
                 every second), PUTs and downloads per pod;
  restart        the operator stopped and started again with everything in place: time
                 until every pod has had its desired set from the new process and every
                 LoraAdapter is Ready; re-downloads, drops and new downloads (must be 0)
                 and LoraAdapter writes (status patches) during it;
  pass time      one pass (``Reconciler.run_pass``, in a separate process against the same
                 emulator and stand-ins) at 100, 300 and 1,000 adapters: the pass that first
                 sees the new adapters (writes their status) and steady passes (nothing
                 changed), listing the world and then reading the watch-fed index (what
                 the running operator does between full lists); PUTs per pod per pass;
                 a cProfile of a steady pass and of a cold
                 one at the largest size (top entries by cumulative time).

    .venv/bin/python bench/bench_control_plane.py
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import io
import json
import os
import platform
import pstats
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from procs import cpu_facts  # noqa: E402

LORA = ("loramux.io/v1alpha1", "loraadapters")
LABELS = {"app.kubernetes.io/name": "loramux-inference"}
BASE = "tiny-llama"
TARGET_S = 60.0


# ------------------------------------------------------------------------------ stand-ins
class StandIn:
    """One pod's stand-in sidecar (thread-safe); see the module docstring."""

    def __init__(self, name: str) -> None:
        from loramux.contracts import SyncState

        self.name = name
        self.lock = threading.Lock()
        self.held: dict[tuple[str, str], bool] = {}  # (tenant, version) -> active
        self.ever: set[tuple[str, str]] = set()
        self.counts = {"puts": 0, "gets": 0, "downloads": 0, "redownloads": 0, "drops": 0,
                       "bad_puts": 0}
        self.state = SyncState(server_reachable=True).model_dump_json().encode()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def put(self, body: bytes) -> None:
        from loramux.contracts import (
            AdapterList,
            AdapterState,
            AdapterView,
            DesiredState,
            Residency,
            SyncPhase,
            SyncState,
            VersionStatus,
        )

        desired = DesiredState.model_validate_json(body)
        want = {(a.tenant, a.version): a.active for a in desired.adapters}
        with self.lock:
            self.counts["puts"] += 1
            for key in want:
                if key not in self.held:
                    self.counts["downloads"] += 1
                    if key in self.ever:
                        self.counts["redownloads"] += 1
            self.counts["drops"] += sum(1 for key in self.held if key not in want)
            self.held = want
            self.ever |= set(want)
            state = SyncState(
                adapters=[VersionStatus(tenant=t, version=v, phase=SyncPhase.READY,
                                        digest="sha256:" + "0" * 64)
                          for (t, v) in sorted(want)],
                server_reachable=True, last_pass=time.time(),
                server=AdapterList(
                    adapters=[AdapterView(tenant=t, version=v, state=AdapterState.READY,
                                          residency=Residency.DEVICE, active=active, rank=8)
                              for (t, v), active in sorted(want.items())],
                    base_model=BASE),
            )
            self.state = state.model_dump_json().encode()

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {**self.counts, "held": len(self.held)}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path.startswith("/v1/state"):
                    with standin.lock:
                        standin.counts["gets"] += 1
                        body = standin.state
                    self._send(200, body)
                else:
                    self._send(404, b'{"error":{"message":"no","code":"not_found","status":404}}')

            def do_PUT(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self.path.startswith("/v1/desired"):
                    self._send(404, b"{}")
                    return
                try:
                    standin.put(body)
                except ValueError as exc:
                    with standin.lock:
                        standin.counts["bad_puts"] += 1
                    self._send(422, json.dumps({"error": {"message": str(exc)[:300],
                                                          "code": "invalid", "status": 422}
                                                }).encode())
                    return
                self._send(200, b"{}")

        return Handler

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ------------------------------------------------------------------------------ emulator
class Emulator:
    """The kmock emulator in a child process (``--emulator DIR`` mode of this script)."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        for stale in ("url", "kubeconfig"):
            (workdir / stale).unlink(missing_ok=True)
        self.workdir = workdir
        self.log = open(workdir / "emulator.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-P", str(Path(__file__).resolve()),
                                      "--emulator", str(workdir)], stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not (workdir / "url").is_file():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((workdir / "emulator.log").read_text()[-2000:])
            time.sleep(0.1)
        self.url = (workdir / "url").read_text().strip()
        self.kubeconfig = workdir / "kubeconfig"
        from k8s_harness import KubeClient

        self.api = KubeClient(self.url)

    def stop(self) -> None:
        self.api.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def run_emulator(workdir: Path) -> None:
    from k8s_harness import CRD_PATH, KubeServer

    server = KubeServer(workdir).start()
    server.register_crd_file(CRD_PATH)
    (workdir / "url.tmp").write_text(server.url)
    (workdir / "url.tmp").rename(workdir / "url")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()


def add_pods(api: Any, standins: list[StandIn]) -> None:
    from k8s_harness import pod_manifest, pod_status

    for s in standins:
        api.create(pod_manifest(s.name, s.port, s.port, labels=LABELS))
        api.patch_status("v1", "pods", s.name, pod_status(True))


def add_adapters(api: Any, start: int, stop: int) -> float:
    t0 = time.perf_counter()
    for i in range(start, stop):
        api.create({"apiVersion": LORA[0], "kind": "LoraAdapter",
                    "metadata": {"name": f"t{i}", "namespace": "default"},
                    "spec": {"tenant": f"t{i}", "version": "v1",
                             "source": {"uri": f"s3://bench/adapters/t{i}/v1/"},
                             "baseModel": BASE, "replicas": 1,
                             "pool": {"matchLabels": dict(LABELS)}}})
    return time.perf_counter() - t0


def readiness(api: Any) -> tuple[int, int, dict[str, str]]:
    items = api.list(*LORA)["items"]
    ready = sum(1 for o in items if (o.get("status") or {}).get("phase") == "Ready")
    return ready, len(items), {o["metadata"]["name"]: o["metadata"]["resourceVersion"]
                               for o in items}


def totals(standins: list[StandIn]) -> dict[str, Any]:
    snaps = [s.snapshot() for s in standins]
    out: dict[str, Any] = {k: sum(s[k] for s in snaps) for k in snaps[0]}
    out["puts_per_pod_max"] = max(s["puts"] for s in snaps)
    out["puts_per_pod_min"] = min(s["puts"] for s in snaps)
    out["held_per_pod"] = sorted(s["held"] for s in snaps)
    return out


def diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in ("puts", "gets", "downloads", "redownloads",
                                              "drops", "bad_puts")}


# ------------------------------------------------------------------------------ operator
class Operator:
    def __init__(self, kubeconfig: Path, log_path: Path, resync: float) -> None:
        self.argv = [sys.executable, "-P", "-m", "loramux.cli", "operator",
                     "--namespace", "default", "--health-port", "0",
                     "--resync-seconds", str(resync), "--log-format", "text"]
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True, cwd=REPO)
        log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_converged(api: Any, standins: list[StandIn], n: int, timeout: float,
                   since: dict[str, Any] | None = None) -> dict[str, Any]:
    """Poll every second until all ``n`` LoraAdapters are Ready (and, with ``since``, every
    stand-in has had a PUT after it); the timeline and when."""
    t0 = time.monotonic()
    timeline: list[tuple[float, int]] = []
    every_put_at = None
    while True:
        ready, _, _ = readiness(api)
        now = time.monotonic() - t0
        timeline.append((round(now, 2), ready))
        if since is not None and every_put_at is None and all(
                s.snapshot()["puts"] > since[s.name] for s in standins):
            every_put_at = now
        done = ready >= n and (since is None or every_put_at is not None)
        if done or now > timeout:
            return {"converged": done, "seconds": round(now, 2), "ready": ready,
                    "every_pod_put_s": every_put_at, "timeline": timeline}
        time.sleep(1.0)


# ------------------------------------------------------------------------------ pass worker
def pass_worker(passes: int, profile_out: Path | None) -> None:
    """In a child process (KUBECONFIG set): ``passes`` passes of the real Reconciler; times
    of each, and a cProfile of the first (cold) and the last (steady) one."""
    from loramux.operator.hot_tenants import HotTenants
    from loramux.operator.kube import KubeApi
    from loramux.operator.reconcile import Reconciler
    from loramux.operator.settings import OperatorSettings

    async def go() -> dict[str, Any]:
        settings = OperatorSettings(namespace="default", health_port=0)
        rec = Reconciler(settings)
        rec.kube = KubeApi()
        rec.http = httpx.AsyncClient(timeout=settings.request_timeout_seconds)
        rec.hot = HotTenants(rec.kube, None, cluster_domain=settings.cluster_domain)
        times, profiles, results = [], {}, []
        for i in range(passes):
            prof = cProfile.Profile() if i in (0, passes - 1) else None
            t0 = time.perf_counter()
            if prof is not None:
                prof.enable()
            result = await rec.run_pass()
            if prof is not None:
                prof.disable()
            times.append(round(time.perf_counter() - t0, 3))
            results.append({"ok": result.ok, "transient": result.transient,
                            "error": result.error, "statuses": len(result.statuses),
                            "ready": sum(1 for s in result.statuses.values()
                                         if s.get("phase") == "Ready")})
            if prof is not None:
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
                profiles["cold" if i == 0 else "steady"] = out.getvalue()
        # What the running operator does between full lists: kopf's watches feed the index
        # (operator/index.py) and a pass reads it. No watch runs in this worker; nothing
        # changes during these passes, and the index holds the last list plus the status
        # patches the passes wrote, exactly what the watches would have delivered.
        rec.index.watching = True
        indexed = []
        for _ in range(passes):
            t0 = time.perf_counter()
            result = await rec.run_pass()
            indexed.append(round(time.perf_counter() - t0, 3))
            results.append({"ok": result.ok, "indexed": True, "error": result.error,
                            "statuses": len(result.statuses)})
        await rec.http.aclose()
        return {"times_s": times, "indexed_times_s": indexed, "results": results,
                "profiles": profiles, "index": vars(rec.index.stats)}

    report = asyncio.run(go())
    text = json.dumps(report)
    if profile_out is not None:
        profile_out.write_text(text)
    print(text[:2000])


def pass_times(emulator: Emulator, standins: list[StandIn], passes: int, workdir: Path,
               label: str) -> dict[str, Any]:
    before = totals(standins)
    out = workdir / f"passes-{label}.json"
    env = {**os.environ, "KUBECONFIG": str(emulator.kubeconfig)}
    subprocess.run([sys.executable, "-P", str(Path(__file__).resolve()), "--pass-worker",
                    str(passes), "--worker-out", str(out)], env=env, check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, timeout=900)
    report = json.loads(out.read_text())
    d = diff(totals(standins), before)
    per_pod = [s.snapshot()["puts"] for s in standins]
    report["standins"] = d
    report["puts_per_pod_per_pass"] = round(d["puts"] / (len(standins) * 2 * passes), 3)
    report["puts_per_pod_total"] = sorted(set(per_pod))
    return report


def top_lines(profile: str, n: int = 18) -> list[str]:
    lines = profile.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return [line.rstrip() for line in lines[start:start + n + 1] if line.strip()]


# ------------------------------------------------------------------------------ plot
def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    scale = report["pass_time"]
    ns = [row["adapters"] for row in scale]
    ax1.plot(ns, [row["cold_pass_s"] for row in scale], "o-",
             label="first pass after adding (writes the new adapters' status)")
    ax1.plot(ns, [row["steady_pass_s"] for row in scale], "s-",
             label="steady pass, listing every LoraAdapter and pod")
    if all("steady_indexed_pass_s" in row for row in scale):
        ax1.plot(ns, [row["steady_indexed_pass_s"] for row in scale], "^-",
                 label="steady pass reading the watch-fed index (the running operator)")
    for row in scale:
        ax1.annotate(f"{row['steady_pass_s']:.2f}s", (row["adapters"], row["steady_pass_s"]),
                     textcoords="offset points", xytext=(4, -12), fontsize=8)
        ax1.annotate(f"{row['cold_pass_s']:.2f}s", (row["adapters"], row["cold_pass_s"]),
                     textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax1.set_xlabel("LoraAdapters (20 pool pods, replicas: 1)")
    ax1.set_ylabel("operator pass time, s")
    ax1.set_title("One reconcile pass vs number of adapters", fontsize=10)
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    for key, style in (("cold", "-"), ("restart", "--")):
        run = report.get(key) or {}
        tl = run.get("timeline") or []
        if tl:
            ax2.plot([t for t, _ in tl], [r for _, r in tl], style,
                     label=f"{key}: {run['seconds']:.0f}s"
                     + ("" if run.get("converged") else " (not converged)"))
    ax2.axvline(TARGET_S, color="#d62728", linestyle=":", linewidth=1)
    ax2.annotate("target 60 s", (TARGET_S, 0), textcoords="offset points", xytext=(3, 5),
                 fontsize=8, color="#d62728")
    ax2.set_xlabel("seconds since the operator started")
    ax2.set_ylabel("LoraAdapters Ready")
    ax2.set_title(f"Convergence, {report['settings']['adapters']} adapters x "
                  f"{report['settings']['pods']} pods", fontsize=10)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle(f"loramux operator against the emulated API server — "
                 f"{report['machine']['model']} ({report['machine']['cpus']} CPUs)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=20)
    parser.add_argument("--scales", default="100,300,1000")
    parser.add_argument("--passes", type=int, default=3, help="passes per scale")
    parser.add_argument("--timeout", type=float, default=600, help="per convergence, s")
    parser.add_argument("--resync", type=float, default=30.0, help="operator --resync-seconds")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-convergence", action="store_true")
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "control_plane")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "control_plane.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "control_plane.png")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--emulator", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pass-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emulator is not None:
        run_emulator(args.emulator)
        return
    if args.pass_worker is not None:
        pass_worker(args.pass_worker, args.worker_out)
        return
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.plot)
        return
    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "bench_control_plane",
        "started_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "git": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip(),
        "operator_dirty": bool(subprocess.run(["git", "status", "--porcelain", "--",
                                               "operator", "loramux"], cwd=REPO,
                                              capture_output=True, text=True).stdout),
        "machine": {**cpu_facts(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "settings": {"adapters": args.adapters, "pods": args.pods, "replicas": 1,
                     "resync_seconds": args.resync, "scales": args.scales},
        "target_s": TARGET_S,
    }
    scales = [int(x) for x in args.scales.split(",")]

    if not args.skip_scaling:
        emulator = Emulator(args.workdir / "scaling")
        standins = [StandIn(f"pool-{i:02d}") for i in range(args.pods)]
        try:
            add_pods(emulator.api, standins)
            rows, have = [], 0
            for n in scales:
                created = add_adapters(emulator.api, have, n)
                have = n
                run = pass_times(emulator, standins, args.passes, args.workdir, str(n))
                row = {"adapters": n, "create_s": round(created, 2),
                       "cold_pass_s": run["times_s"][0],
                       "steady_pass_s": min(run["times_s"][1:]) if len(run["times_s"]) > 1
                       else None, "times_s": run["times_s"], "results": run["results"],
                       "steady_indexed_pass_s": min(run["indexed_times_s"]),
                       "indexed_times_s": run["indexed_times_s"], "index": run["index"],
                       "puts_per_pod_per_pass": run["puts_per_pod_per_pass"],
                       "standins": run["standins"],
                       "profile_cold_top": top_lines(run["profiles"].get("cold", "")),
                       "profile_steady_top": top_lines(run["profiles"].get("steady", ""))}
                rows.append(row)
                print(f"{n} adapters: passes {run['times_s']} s, reading the index "
                      f"{run['indexed_times_s']} s, PUTs/pod/pass "
                      f"{run['puts_per_pod_per_pass']}, stand-ins {run['standins']}", flush=True)
            report["pass_time"] = rows
        finally:
            for s in standins:
                s.stop()
            emulator.stop()

    if not args.skip_convergence:
        emulator = Emulator(args.workdir / "convergence")
        standins = [StandIn(f"pool-{i:02d}") for i in range(args.pods)]
        op_log = args.workdir / "operator.log"
        op_log.unlink(missing_ok=True)
        operator = Operator(emulator.kubeconfig, op_log, args.resync)
        try:
            add_pods(emulator.api, standins)
            report["create_adapters_s"] = round(add_adapters(emulator.api, 0, args.adapters), 2)
            print(f"{args.adapters} LoraAdapters created in {report['create_adapters_s']}s",
                  flush=True)
            before = totals(standins)
            operator.start()
            cold = wait_converged(emulator.api, standins, args.adapters, args.timeout)
            cold["standins"] = diff(totals(standins), before)
            cold["held_per_pod"] = totals(standins)["held_per_pod"]
            report["cold"] = cold
            print(f"cold start: converged={cold['converged']} in {cold['seconds']}s; "
                  f"stand-ins {cold['standins']}", flush=True)
            time.sleep(5)  # let the passes in flight finish
            operator.stop()
            _, _, versions = readiness(emulator.api)
            before = totals(standins)
            since = {s.name: s.snapshot()["puts"] for s in standins}
            operator.start()
            restart = wait_converged(emulator.api, standins, args.adapters, args.timeout,
                                     since=since)
            time.sleep(10)  # the resumed handlers' passes
            restart["standins_incl_10s_after"] = diff(totals(standins), before)
            _, _, after = readiness(emulator.api)
            restart["lora_objects_written"] = sum(1 for k, v in after.items()
                                                  if versions.get(k) != v)
            report["restart"] = restart
            print(f"restart: converged={restart['converged']} in {restart['seconds']}s "
                  f"(every pod re-sent its set after {restart['every_pod_put_s']}s); "
                  f"stand-ins {restart['standins_incl_10s_after']}; LoraAdapters written "
                  f"{restart['lora_objects_written']}", flush=True)
        finally:
            operator.stop()
            for s in standins:
                s.stop()
            emulator.stop()
        report["operator_log_tail"] = op_log.read_text(errors="replace").splitlines()[-30:]

    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} in {report['wall_s']}s")
    if "pass_time" in report and "cold" in report:
        plot(report, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
