"""Hot tenant: merged dedicated server against unmerged in the shared pool, with other
tenants' traffic present.

SmolLM2-135M-Instruct, 8 random rank-16 q/k/v/o tenants. ``tenant-0`` is hot: ``--hot-clients``
clients send it requests while one client per other tenant keeps the pool busy. Every
request asks for exactly ``--max-new-tokens`` tokens (greedy, ``ignore_eos``); all clients
talk to the pool's URL, as they would to the pool's Service.

  unmerged  one pool server (NF4) serves everybody on both cores;
  merged    the pool server forwards tenant-0 (``PUT /admin/tenants/tenant-0/route``) to a
            second server running ``--merge-adapter`` (bf16 base, adapter merged in). The
            two servers split the machine: each is pinned to one core with one torch thread,
            standing in for the dedicated Deployment's own accelerator. Same total hardware.

Reported: tokens/s and p50/p99 latency of the hot tenant, and of the other tenants.

    .venv/bin/python bench/bench_hot_tenant.py --hot-clients 6 --requests-per-client 3
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from bench_adapters import tenant_adapters  # noqa: E402
from loadgen import DEFAULT_PROMPTS, run_load  # noqa: E402
from procs import LoramuxProc  # noqa: E402

PYTHON = sys.executable
HOT = "tenant-0"
DEFAULT_OUT = HERE / "results" / "bench_hot_tenant.json"


def serve(name: str, args: list[str], logs: Path, cpus: set[int] | None = None) -> LoramuxProc:
    return LoramuxProc(name, ["serve", "--port", "0", "--log-format", "text", "--auth", "none",
                                 *args], logs,
                       cpus=cpus)


async def workload(url: str, others: list[str], hot_clients: int, rpc: int,
                   tokens: int) -> dict[str, Any]:
    # warm-up: every tenant once
    async with httpx.AsyncClient(timeout=300) as client:
        for tenant in [HOT, *others]:
            r = await client.post(f"{url}/generate", json={"tenant_id": tenant, "prompt": "hi",
                                                           "max_new_tokens": 4})
            r.raise_for_status()
    hot, rest = await asyncio.gather(
        run_load(url, [HOT], DEFAULT_PROMPTS, hot_clients, rpc, tokens),
        run_load(url, others, DEFAULT_PROMPTS, len(others), rpc, tokens),
    )
    return {"hot": hot.to_dict(), "others": rest.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--hot-clients", type=int, default=6)
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    adapters = tenant_adapters(args.tenants)
    others = [t for t in adapters if t != HOT]
    logs = HERE / "results" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    preload = [f for t, p in adapters.items() for f in ("--adapter", f"{t}@v1={p}")]
    results: dict[str, Any] = {}
    load = (others, args.hot_clients, args.requests_per_client, args.max_new_tokens)

    print("unmerged: one pool server on both cores", flush=True)
    pool = serve("hot-pool-unmerged", ["--quantization", "nf4", "--torch-threads", "2",
                                       *preload], logs)
    try:
        results["unmerged"] = asyncio.run(workload(pool.url, *load))
    finally:
        pool.stop()

    print("merged: pool on core 0 forwards tenant-0 to a merged server on core 1", flush=True)
    pool = serve("hot-pool", ["--quantization", "nf4", "--torch-threads", "1", *preload],
                 logs, cpus={0})
    merged = serve("hot-merged", ["--quantization", "bf16", "--torch-threads", "1",
                                 "--merge-adapter", str(adapters[HOT]),
                                 "--merge-adapter-ref", f"{HOT}@v1"], logs, cpus={1})
    try:
        r = httpx.put(f"{pool.url}/admin/tenants/{HOT}/route",
                      json={"url": merged.url, "version": "v1"}, timeout=10)
        r.raise_for_status()
        results["merged"] = asyncio.run(workload(pool.url, *load))
        routes = httpx.get(f"{pool.url}/admin/routes", timeout=10).json()["routes"]
        results["merged"]["route"] = routes[0]
    finally:
        merged.stop()
        pool.stop()

    summary = {}
    for key, res in results.items():
        for group in ("hot", "others"):
            r = res[group]
            summary[f"{key}.{group}"] = {
                "tok_s": round(r["tokens_per_s"], 1), "p50_s": round(r["p50_latency_s"], 2),
                "p99_s": round(r["p99_latency_s"], 2), "failures": r["failures"]}
    summary["hot_tok_s_ratio_merged_over_unmerged"] = round(
        results["merged"]["hot"]["tokens_per_s"] / results["unmerged"]["hot"]["tokens_per_s"], 2)
    record = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{psutil.cpu_count()} CPUs",
              "command": " ".join([Path(PYTHON).name, *sys.argv]), "args": vars(args) | {
                  "out": str(args.out)}, "summary": summary, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(summary, indent=2))
    if args.out == DEFAULT_OUT:  # a trial run with --out elsewhere leaves the report alone
        plot(summary, REPO / "docs" / "img" / "hot_tenant.png")


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (tput, lat) = plt.subplots(1, 2, figsize=(9, 3.4))
    groups = ["hot", "others"]
    for i, key in enumerate(["unmerged", "merged"]):
        xs = [g + (i - 0.5) * 0.36 for g in range(len(groups))]
        tput.bar(xs, [summary[f"{key}.{g}"]["tok_s"] for g in groups], width=0.36, label=key)
        lat.bar(xs, [summary[f"{key}.{g}"]["p50_s"] for g in groups], width=0.36, label=key)
        lat.errorbar(xs, [summary[f"{key}.{g}"]["p50_s"] for g in groups],
                     yerr=[[0, 0], [summary[f"{key}.{g}"]["p99_s"]
                                    - summary[f"{key}.{g}"]["p50_s"] for g in groups]],
                     fmt="none", ecolor="black", capsize=3)
    for ax, title in ((tput, "tokens/s"), (lat, "latency p50 (bar) to p99 (s)")):
        ax.set_xticks(range(len(groups)), ["hot tenant", "other 7 tenants"])
        ax.set_title(title)
    tput.legend()
    fig.suptitle("Hot tenant: merged dedicated server vs unmerged in the pool (2 cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if sys.argv[1:] == ["--plot-only"]:
        plot(json.loads((HERE / "results" / "bench_hot_tenant.json").read_text())["summary"],
             REPO / "docs" / "img" / "hot_tenant.png")
    else:
        main()
