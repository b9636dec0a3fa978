"""Adapter-sync sidecar benchmark: how fast a desired adapter becomes servable.

Real processes on loopback: moto's S3 server (in this process), ``loramux serve`` on the
embedded SmolLM2-135M-Instruct (NF4), and ``loramux sync`` beside it on a fresh volume.
The adapters are random rank-16 LoRAs on all seven linear modules of every layer, about
19.6 MB of fp32 safetensors each, published with ``loramux push``'s ``push()``.

Three measurements, each the wall time from ``PUT /v1/desired`` until ``GET /v1/state``
says ``Ready`` (polled every 20 ms):

  cold   the version is on S3 only: download, verify (sha256 of every file against the
         manifest), atomic rename, then the server loads it (disk -> host -> device);
  warm   the verified files are already on the volume, the server does not hold the
         adapter: a restarted sidecar re-verifies the files (no download) and the server
         loads them (what happens after a server or pod-container restart);
  batch  ``--batch`` distinct adapters desired at once on a fresh volume: adapters brought
         to Ready per minute by one sidecar (``--max-concurrent-downloads`` in flight).

    .venv/bin/python bench/bench_sync.py --repeats 5 --batch 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_adapters import ALL_LINEAR, DEFAULT_CACHE, make_adapters  # noqa: E402
from procs import LoramuxProc as Proc  # noqa: E402

PYTHON = sys.executable
BUCKET = "loramux-bench"
RANK = 16


def build_and_push(count: int, s3_url: str) -> dict[str, dict[str, str]]:
    """``count`` adapters ``sync-<i>@v1`` with manifests, pushed to moto; name -> uri, sha."""
    import boto3

    from loramux.manifest import AdapterManifest, describe_files, write_manifest
    from loramux.training.publish import push

    root = DEFAULT_CACHE / "sync"
    specs = [(root / f"sync-{i}" / "v1", RANK, ALL_LINEAR, 5000 + i) for i in range(count)]
    dirs = make_adapters(specs)
    client = boto3.client("s3", endpoint_url=s3_url, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    client.create_bucket(Bucket=BUCKET)
    published: dict[str, dict[str, str]] = {}
    for i, directory in enumerate(dirs):
        tenant = f"sync-{i}"
        config = json.loads((directory / "adapter_config.json").read_text())
        files = describe_files(directory)
        manifest = AdapterManifest(tenant=tenant, version="v1",
                                   base_model=config["base_model_name_or_path"] or "unknown",
                                   rank=RANK, lora_alpha=config["lora_alpha"],
                                   target_modules=config["target_modules"], files=files)
        sha = write_manifest(directory, manifest)
        uri = f"s3://{BUCKET}/adapters/{tenant}/v1/"
        push(directory, uri, client=client, progress=False, force=True)
        published[tenant] = {"uri": uri, "sha256": sha,
                             "bytes": str(sum(f.size for f in files))}
    return published


def put_desired(sidecar: str, entries: list[dict[str, Any]]) -> None:
    response = httpx.put(f"{sidecar}/v1/desired", json={"adapters": entries}, timeout=30)
    response.raise_for_status()


def wait_ready(sidecar: str, tenants: set[str], timeout: float = 600) -> dict[str, Any]:
    """Poll /v1/state until every tenant's v1 is Ready; return the states."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{sidecar}/v1/state", timeout=30).json()
        by_tenant = {a["tenant"]: a for a in state["adapters"]}
        failed = [a for a in by_tenant.values() if a["phase"] == "Failed"]
        if failed:
            raise RuntimeError(f"adapter failed: {failed}")
        if all(by_tenant.get(t, {}).get("phase") == "Ready" for t in tenants):
            return by_tenant
        time.sleep(0.02)
    raise TimeoutError(f"not Ready within {timeout}s: {tenants}")


def entry(published: dict[str, dict[str, str]], tenant: str) -> dict[str, Any]:
    return {"tenant": tenant, "version": "v1", "uri": published[tenant]["uri"],
            "sha256": published[tenant]["sha256"]}


def evict(server: str, tenant: str) -> None:
    httpx.delete(f"{server}/admin/adapters/{tenant}/v1", timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="cold and warm samples")
    ap.add_argument("--batch", type=int, default=16, help="adapters desired at once")
    ap.add_argument("--max-concurrent-downloads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_sync.json")
    args = ap.parse_args()

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request
    work = Path(tempfile.mkdtemp(prefix="loramux-bench-sync-"))
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    s3_url = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": s3_url, "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1"}
    count = max(args.repeats, args.batch)
    print(f"building and pushing {count} adapters (rank {RANK}, all linear modules)",
          flush=True)
    published = build_and_push(count, s3_url)
    size_mb = int(published["sync-0"]["bytes"]) / 1e6

    server = Proc("server", ["serve", "--port", "0", "--auth", "none",
                             "--device-adapter-slots", "64",
                             "--device-cache-bytes", str(4 * 1024**3)], work, env)
    sync_args = ["sync", "--port", "0", "--server-url", server.url, "--resync-seconds", "5",
                 "--max-concurrent-downloads", str(args.max_concurrent_downloads)]
    results: dict[str, Any] = {"cold": [], "warm": []}
    try:
        # cold and warm, one adapter at a time
        volume = work / "volume-single"
        for i in range(args.repeats):
            tenant = f"sync-{i}"
            sidecar = Proc(f"sync-cold-{i}", [*sync_args, "--root", str(volume)], work, env)
            started = time.perf_counter()
            put_desired(sidecar.url, [entry(published, tenant)])
            state = wait_ready(sidecar.url, {tenant})[tenant]
            cold = time.perf_counter() - started
            sidecar.stop()
            results["cold"].append({"seconds": cold, **state["timings"]})
            # warm: the server drops it, a new sidecar finds verified files on the volume
            evict(server.url, tenant)
            sidecar = Proc(f"sync-warm-{i}", [*sync_args, "--root", str(volume)], work, env)
            started = time.perf_counter()
            put_desired(sidecar.url, [entry(published, tenant)])
            state = wait_ready(sidecar.url, {tenant})[tenant]
            warm = time.perf_counter() - started
            results["warm"].append({"seconds": warm, **state["timings"]})
            put_desired(sidecar.url, [])  # evict and delete, for the next round
            time.sleep(0.5)
            sidecar.stop()
            print(f"  {tenant}: cold {cold:.2f}s  warm {warm:.2f}s  timings cold "
                  f"{results['cold'][-1]}  warm {results['warm'][-1]}", flush=True)

        # throughput: many at once on a fresh volume
        tenants = [f"sync-{i}" for i in range(args.batch)]
        sidecar = Proc("sync-batch", [*sync_args, "--root", str(work / "volume-batch")],
                       work, env)
        started = time.perf_counter()
        put_desired(sidecar.url, [entry(published, t) for t in tenants])
        wait_ready(sidecar.url, set(tenants))
        batch_s = time.perf_counter() - started
        sidecar.stop()
        results["batch"] = {"adapters": args.batch, "seconds": batch_s,
                            "per_minute": args.batch / batch_s * 60,
                            "max_concurrent_downloads": args.max_concurrent_downloads}
    finally:
        server.stop()
        moto.stop()

    def med(key: str, field: str = "seconds") -> float:
        values = [r[field] for r in results[key] if r.get(field) is not None]
        return statistics.median(values) if values else float("nan")

    summary = {
        "adapter_mb": round(size_mb, 1),
        "cold_median_s": round(med("cold"), 3),
        "cold_fetch_median_s": round(med("cold", "fetch_seconds"), 3),
        "cold_load_median_s": round(med("cold", "load_seconds"), 3),
        "warm_median_s": round(med("warm"), 3),
        "warm_verify_median_s": round(med("warm", "fetch_seconds"), 3),
        "warm_load_median_s": round(med("warm", "load_seconds"), 3),
        "cold_over_warm": round(med("cold") / med("warm"), 2),
        "batch_adapters": args.batch,
        "batch_seconds": round(results["batch"]["seconds"], 2),
        "adapters_per_minute": round(results["batch"]["per_minute"], 1),
    }
    record = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{psutil.cpu_count()} CPUs, "
                         f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
              "command": " ".join([Path(PYTHON).name, *sys.argv]),
              "summary": summary, "samples": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
