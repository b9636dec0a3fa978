"""Metrics with a thousand tenants that had traffic (issue 17): scrape time and size.

Two parts:

  in process   ``inference/metrics.py`` as it is now against the version before the change
               (``git show <--before>:inference/metrics.py``, loaded as a module: no checkout),
               both fed the same synthetic traffic over ``--tenants`` tenants (every tenant
               ``--requests-per-tenant`` requests: the requests and token counters, a TTFT
               and a latency observation each, one in ten a timeout), plus 64 device-resident
               tenants in ``loramux_tenant_in_flight``. Measured: ``generate_latest`` of the
               per-tenant registry (``/admin/metrics``, the metrics port) and of the public
               view (``/metrics``), median of ``--repeat`` calls, and the bytes; and the cost
               of one request's observations. Same process, same machine, same traffic.
  over HTTP    one real ``loramux serve`` (the tiny Llama and the 1,000 rank-8 adapters of
               bench_many_tenants.py, ``--device-adapter-slots 64``, the host tier half of the
               adapters, ``--metrics-tenant-histograms`` at its default of 64), 1,000 adapters
               registered through the admin API, one request per tenant (16 at a time) so
               every tenant had traffic, then 20 GETs each of ``/metrics``,
               ``/admin/metrics`` and ``/healthz`` (the floor of a GET) on the idle server:
               p50, p99, bytes; and 20 GETs of ``/metrics`` before any tenant was
               registered.

    .venv/bin/python bench/bench_metrics.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from bench_many_tenants import build, register, timed_get  # noqa: E402
from procs import LoramuxProc, cpu_facts  # noqa: E402

BEFORE = "1bc2bcd"  # the last commit with the sum-at-scrape public view


def _module(name: str, source: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    sys.modules[name] = mod  # dataclasses and annotations look their module up
    exec(compile(source, f"<{name}>", "exec"), mod.__dict__)
    return mod


def _feed(m: Any, tenants: int, per_tenant: int, seed: int) -> float:
    """The engine's observations for ``per_tenant`` requests of each tenant; seconds per
    request."""
    rng = random.Random(seed)
    jobs = [f"t{i}" for i in range(tenants) for _ in range(per_tenant)]
    rng.shuffle(jobs)
    values = [(rng.random() < 0.1, rng.randint(5, 200), rng.randint(1, 64),
               rng.uniform(0.005, 2), rng.uniform(0.05, 30)) for _ in jobs]
    t0 = time.perf_counter()
    for tenant, (timeout, prompt, completion, ttft, e2e) in zip(jobs, values, strict=True):
        if timeout:
            m.requests.labels(tenant, "timeout").inc()
            continue
        m.ttft.labels(tenant).observe(ttft)
        m.requests.labels(tenant, "ok").inc()
        m.prompt_tokens.labels(tenant).inc(prompt)
        m.completion_tokens.labels(tenant).inc(completion)
        m.e2e.labels(tenant).observe(e2e)
    return (time.perf_counter() - t0) / len(jobs)


def _scrape(registry: Any, repeat: int) -> dict[str, Any]:
    from prometheus_client import generate_latest

    times, body = [], b""
    for _ in range(repeat):
        t0 = time.perf_counter()
        body = generate_latest(registry)
        times.append(time.perf_counter() - t0)
    return {"p50_ms": round(1000 * statistics.median(times), 2), "bytes": len(body),
            "lines": body.count(b"\n")}


def in_process(args: argparse.Namespace) -> dict[str, Any]:
    old_src = subprocess.run(["git", "show", f"{args.before}:inference/metrics.py"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    old = _module("metrics_before", old_src)
    from loramux.inference import metrics as new

    load = [(f"t{i}", "device", 0) for i in range(64)]
    out: dict[str, Any] = {}
    for tenants in (10, args.tenants):
        row: dict[str, Any] = {}
        for label, mod in (("before", old), ("after", new)):
            m = mod.Metrics()
            m.track_tenant_load(lambda: load)
            per_request = _feed(m, tenants, args.requests_per_tenant, args.seed)
            public = (old.summed_over_tenants(m.registry) if mod is old else m.public_registry)
            row[label] = {"per_tenant_scrape": _scrape(m.registry, args.repeat),
                          "public_scrape": _scrape(public, args.repeat),
                          "observe_us_per_request": round(1e6 * per_request, 2)}
        out[f"{tenants}_tenants"] = row
        print(f"in process, {tenants} tenants: {json.dumps(row)}", flush=True)
    return out


async def _one_each(url: str, tenants: list[str], concurrency: int) -> int:
    failures = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient, tenant: str) -> None:
        nonlocal failures
        async with gate:
            r = await client.post("/generate", json={
                "tenant_id": tenant, "prompt": "A short note.", "max_new_tokens": 2,
                "ignore_eos": True})
            failures += r.status_code != 200

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(one(client, t) for t in tenants))
    return failures


def over_http(args: argparse.Namespace) -> dict[str, Any]:
    model, dirs, nbytes = build(args.tenants)
    host_bytes = nbytes * args.tenants // 2
    flags = ["serve", "--port", "0", "--log-format", "text", "--auth", "none",
             "--model", str(model), "--quantization", "none", "--max-batch-size", "16",
             "--max-queue", "4096", "--device-adapter-slots", "64",
             "--host-cache-bytes", str(host_bytes), "--max-lora-rank", "16"]
    proc = LoramuxProc("metrics-scale", flags, args.log_dir)
    try:
        with httpx.Client(base_url=proc.url, timeout=120) as sync:
            # The same scrape before any tenant exists: what "independent of tenants" means.
            empty = timed_get(sync, "/metrics", 20)
            reg = register(sync, dirs)
            print(f"registration: {reg}", flush=True)
            t0 = time.perf_counter()
            failures = asyncio.run(_one_each(proc.url, [f"t{i}" for i in range(args.tenants)],
                                             16))
            traffic_s = time.perf_counter() - t0
            admin = sync.get("/admin/metrics").text
            out = {"server_argv": proc.proc.args, "registration_s": reg["wall_s"],
                   "traffic": {"requests": args.tenants, "failures": failures,
                               "wall_s": round(traffic_s, 1)},
                   "tenants_with_request_series": len(set(re.findall(
                       r'^loramux_requests_total\{[^}]*tenant="([^"]+)"', admin, re.M))),
                   "tenants_with_ttft_histogram": len(set(re.findall(
                       r'^loramux_time_to_first_token_seconds_count\{tenant="([^"]+)"}',
                       admin, re.M))),
                   "public_metrics_no_tenants": empty,
                   "public_metrics": timed_get(sync, "/metrics", 20),
                   "admin_metrics": timed_get(sync, "/admin/metrics", 20),
                   # The floor of a GET on this server: an endpoint that computes nothing.
                   "healthz": timed_get(sync, "/healthz", 20)}
    finally:
        proc.stop()
    print(f"over HTTP: {json.dumps({k: v for k, v in out.items() if k != 'server_argv'})}",
          flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--requests-per-tenant", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--before", default=BEFORE, help="commit of the old metrics.py")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "metrics_scale.json")
    parser.add_argument("--log-dir", type=Path, default=HERE / ".cache" / "logs")
    args = parser.parse_args()
    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]  # the machine is shared
    report: dict[str, Any] = {
        "benchmark": "bench_metrics",
        "started_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "git": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip(),
        "before": args.before,
        "machine": {**cpu_facts(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    report["in_process"] = in_process(args)
    if not args.skip_http:
        report["http"] = over_http(args)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["load_average"] = {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} in {report['wall_s']}s")


if __name__ == "__main__":
    main()
