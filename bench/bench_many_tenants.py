"""A thousand tenants on one pod (issue 17): registration, admin API, throughput and TTFT.

One real ``loramux serve`` (``--auth none``, ``--device-adapter-slots 64``, a host cache that
holds about ``--host-fraction`` of the adapters, so every tier is in use) and ``--tenants``
(1,000) random rank-8 q/k/v/o adapters, registered through the admin API
(``PUT /admin/adapters/{tenant}/v1``, one after the other, each answered once the version is
read and validated). Measured:

  registration   wall time of the 1,000 PUTs, and each PUT's latency (p50/p99);
  admin          latency of ``GET /admin/adapters`` (1,000 versions), ``GET /admin/metrics``
                 (per-tenant series) and ``GET /v1/models`` (20 calls each, idle server;
                 ``/admin/metrics`` again after traffic touched hundreds of tenants);
  TTFT by tier   idle server, one streamed request at a time (``--ttft-samples`` each):
                 *cold* (the adapter is on disk only), *host* (its validated tensors are in
                 the host tier), *device* (it has a device slot); time from sending to the
                 first streamed token, as the client sees it;
  throughput     ``--clients`` closed-loop clients (each sends its next request when the
                 last one is answered), every request a tenant drawn uniformly from the
                 workload's set with a per-client seeded RNG, ``--max-new-tokens`` tokens
                 with ``ignore_eos``, greedy; over 1,000 tenants vs over 8 tenants, same
                 clients. The workloads alternate (``--rounds`` each) so that load from
                 other processes on this shared machine hits both alike; the median round of
                 each is compared. The server's tier hits and misses during each round come
                 from its ``/metrics``.

Model: the 2-layer tiny Llama of tests/factories.py (random weights, the real SmolLM2
tokenizer, fp32). Why not the embedded SmolLM2-135M: the question is whether anything in the
server grows with the number of tenants (the per-step and per-request bookkeeping, the tier
moves, the admin API), and a tiny model makes that overhead *more* visible, not less (a
decode step is ~5 ms, not ~100 ms); SmolLM2 decodes ~20x slower on this 2-core CPU and the
run would not fit in 10 minutes. The adapters are written straight as PEFT safetensors (one
PEFT-built template gives the tensor names; 1,000 seeded random tensor sets take seconds).

    .venv/bin/python bench/bench_many_tenants.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from procs import LoramuxProc, cpu_facts  # noqa: E402

CACHE = HERE / ".cache" / "many_tenants"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK = 8
REQUIRED_RATIO = 0.6
PROMPTS = [
    "Summarise the main obligations of a tenant under a residential lease.",
    "Explain the difference between a virus and a bacterium.",
    "Write a short note to a colleague about tomorrow's meeting.",
    "List three ways to reduce memory use when serving a language model.",
]


def pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def build(count: int) -> tuple[Path, list[Path], int]:
    """The tiny model and ``count`` rank-8 adapters ``t<i>`` (cached); their size in bytes."""
    import torch
    from safetensors.torch import load_file, save_file

    from factories import make_adapter, make_tiny_model
    from loramux.inference.model_loader import ensure_default_model

    model = CACHE / "tiny-llama"
    if not (model / "config.json").is_file():
        make_tiny_model(model, ensure_default_model())
    template = CACHE / "template"
    if not (template / "adapter_model.safetensors").is_file():
        make_adapter(model, template, rank=RANK, targets=TARGETS, seed=1)
    shapes = {k: v.shape for k, v in load_file(template / "adapter_model.safetensors").items()}
    nbytes = sum(4 * torch.Size(s).numel() for s in shapes.values())
    root = CACHE / "adapters"
    dirs = []
    for i in range(count):
        out = root / f"t{i}" / "v1"
        dirs.append(out)
        if (out / "adapter_model.safetensors").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(10_000 + i)
        tensors = {k: (torch.randn(s, generator=gen) * (0.05 if "lora_B" in k else 1.0))
                   for k, s in shapes.items()}
        save_file(tensors, out / "adapter_model.safetensors")
        shutil.copy(template / "adapter_config.json", out / "adapter_config.json")
    return model, dirs, nbytes


def serve(model: Path, args: argparse.Namespace, host_bytes: int) -> LoramuxProc:
    flags = ["serve", "--port", "0", "--log-format", "text",
             "--auth", "none", "--model", str(model), "--quantization", "none",
             "--max-batch-size", str(args.max_batch_size), "--max-queue", "4096",
             "--device-adapter-slots", str(args.device_slots),
             "--host-cache-bytes", str(host_bytes), "--max-lora-rank", "16",
             "--request-timeout-s", "600"]
    return LoramuxProc("many-tenants", flags, args.log_dir)


def timed_get(client: httpx.Client, path: str, n: int) -> dict[str, Any]:
    times, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(path)
        times.append(time.perf_counter() - t0)
        r.raise_for_status()
        size = len(r.content)
    return {"calls": n, "p50_ms": round(1000 * pct(times, 50), 2),
            "p99_ms": round(1000 * pct(times, 99), 2), "max_ms": round(1000 * max(times), 2),
            "bytes": size}


def register(client: httpx.Client, dirs: list[Path]) -> dict[str, Any]:
    times = []
    t0 = time.perf_counter()
    for i, path in enumerate(dirs):
        s = time.perf_counter()
        r = client.put(f"/admin/adapters/t{i}/v1", json={"path": str(path)})
        times.append(time.perf_counter() - s)
        if r.status_code != 200:
            raise RuntimeError(f"PUT t{i}: {r.status_code} {r.text[:300]}")
    wall = time.perf_counter() - t0
    return {"adapters": len(dirs), "wall_s": round(wall, 2),
            "per_second": round(len(dirs) / wall, 1),
            "put_p50_ms": round(1000 * pct(times, 50), 2),
            "put_p99_ms": round(1000 * pct(times, 99), 2),
            "put_first_100_p50_ms": round(1000 * pct(times[:100], 50), 2),
            "put_last_100_p50_ms": round(1000 * pct(times[-100:], 50), 2)}


def residency(client: httpx.Client) -> dict[str, str]:
    data = client.get("/admin/adapters").json()
    return {a["tenant"]: a["residency"] for a in data["adapters"]}


async def first_token(client: httpx.AsyncClient, tenant: str, tokens: int) -> float:
    body = {"tenant_id": tenant, "prompt": PROMPTS[0], "max_new_tokens": tokens,
            "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", "/generate", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{tenant}: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"text"' in line and first is None:
                first = time.perf_counter() - t0
            if '"error"' in line:
                raise RuntimeError(f"{tenant}: {line[:300]}")
    return first if first is not None else time.perf_counter() - t0


def ttft_by_tier(url: str, sync: httpx.Client, samples: int, seed: int) -> dict[str, Any]:
    """Cold (disk), host and device TTFT on an idle server, one request at a time."""
    where = residency(sync)
    rng = random.Random(seed)
    disk = sorted(t for t, r in where.items() if r == "disk")
    host = sorted(t for t, r in where.items() if r == "host")
    cold_t, host_t = rng.sample(disk, min(samples, len(disk))), \
        rng.sample(host, min(samples, len(host)))
    device_t = rng.sample(sorted(set(where) - set(cold_t) - set(host_t)), samples)
    out: dict[str, Any] = {}
    skipped: dict[str, int] = {}

    async def go() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            # Host first: a cold read adds a host copy and may push the least recently
            # used ones out. Each tenant's tier is checked right before its request.
            for tier, tenants in (("host", host_t), ("cold_disk", cold_t)):
                want = "disk" if tier == "cold_disk" else "host"
                out[tier] = []
                for t in tenants:
                    if residency(sync)[t] != want:
                        skipped[tier] = skipped.get(tier, 0) + 1
                        continue
                    out[tier].append(await first_token(client, t, 4))
            for t in device_t:  # bring them onto the device first
                await first_token(client, t, 1)
            now = residency(sync)
            assert all(now[t] == "device" for t in device_t), "device tenants not on device"
            out["device"] = [await first_token(client, t, 4) for t in device_t]

    asyncio.run(go())
    return {tier: {"samples": len(v), "skipped_tier_moved": skipped.get(tier, 0),
                   "p50_ms": round(1000 * pct(v, 50), 2),
                   "p99_ms": round(1000 * pct(v, 99), 2),
                   "all_ms": [round(1000 * x, 2) for x in v]} for tier, v in out.items()}


def tier_counters(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    out: dict[str, float] = {}
    for kind in ("hits", "misses"):
        for tier in ("device", "host"):
            m = re.search(rf'^loramux_adapter_cache_{kind}_total{{tier="{tier}"}} (\S+)$',
                          text, re.M)
            out[f"{tier}_{kind}"] = float(m.group(1)) if m else 0.0
    for name in ("loramux_batch_size_sum", "loramux_batch_size_count"):
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else 0.0
    return out


async def closed_loop(url: str, tenants: list[str], clients: int, per_client: int,
                      tokens: int, seed: int) -> dict[str, Any]:
    failures: list[str] = []
    done_tokens = 0
    latencies: list[float] = []

    async def one_client(client: httpx.AsyncClient, i: int) -> None:
        nonlocal done_tokens
        rng = random.Random(seed * 1000 + i)
        for k in range(per_client):
            body = {"tenant_id": rng.choice(tenants), "prompt": PROMPTS[(i + k) % len(PROMPTS)],
                    "max_new_tokens": tokens, "ignore_eos": True}
            t0 = time.perf_counter()
            r = await client.post("/generate", json=body)
            if r.status_code != 200:
                failures.append(f"{r.status_code} {r.text[:200]}")
                continue
            latencies.append(time.perf_counter() - t0)
            done_tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(client, i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "tokens": done_tokens,
            "tokens_per_s": round(done_tokens / wall, 1), "failures": len(failures),
            "failure_samples": failures[:3],
            "latency_p50_s": round(pct(latencies, 50) or 0, 3),
            "latency_p99_s": round(pct(latencies, 99) or 0, 3)}


def measure(url: str, sync: httpx.Client, proc: psutil.Process, tenants: list[str],
            args: argparse.Namespace, seed: int) -> dict[str, Any]:
    before = tier_counters(sync)
    cpu0, busy0 = proc.cpu_times(), psutil.cpu_times()
    run = asyncio.run(closed_loop(url, tenants, args.clients, args.requests_per_client,
                                  args.max_new_tokens, seed))
    cpu1, busy1 = proc.cpu_times(), psutil.cpu_times()
    after = tier_counters(sync)
    d = {k: after[k] - before[k] for k in after}
    lookups = d["device_hits"] + d["device_misses"]
    server_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    busy = (sum(busy1) - busy1.idle) - (sum(busy0) - busy0.idle)
    run.update(
        distinct_tenants=len(set(tenants)),
        device_hit_rate=round(d["device_hits"] / lookups, 3) if lookups else None,
        host_hits=int(d["host_hits"]), disk_reads=int(d["host_misses"]),
        device_lookups=int(lookups),
        mean_batch=round(d["loramux_batch_size_sum"] / d["loramux_batch_size_count"], 2)
        if d["loramux_batch_size_count"] else None,
        server_cpu_s=round(server_cpu, 1),
        server_cpu_ms_per_token=round(1000 * server_cpu / max(1, run["tokens"]), 3),
        other_cpu_share=round(max(0.0, busy - server_cpu) / (run["wall_s"] *
                                                              (psutil.cpu_count() or 1)), 2))
    return run


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.8))
    tp = report["throughput"]
    few, many = tp["few"], tp["many"]
    labels = [f"{few['distinct_tenants']} tenants", f"{many['distinct_tenants']} tenants"]
    vals = [few["tokens_per_s"], many["tokens_per_s"]]
    bars = ax1.bar(labels, vals, color=["#7f7f7f", "#1f77b4"])
    ax1.bar_label(bars, fmt="%.0f")
    for x, key in enumerate(("few", "many")):
        ax1.scatter([x] * len(tp[f"{key}_rounds"]), [r["tokens_per_s"] for r in
                                                     tp[f"{key}_rounds"]],
                    color="black", s=12, zorder=3)
    ax1.axhline(REQUIRED_RATIO * few["tokens_per_s"], color="#d62728", linestyle="--",
                linewidth=1)
    ax1.set_ylabel("completion tokens / s (closed loop, over HTTP)")
    ax1.set_title(f"Uniform traffic, {report['settings']['clients']} clients: "
                  f"ratio {tp['ratio']:.2f}x (target >= {REQUIRED_RATIO})", fontsize=9)
    tt = report["ttft"]
    tiers = ["device", "host", "cold_disk"]
    p50 = [tt[t]["p50_ms"] for t in tiers]
    p99 = [tt[t]["p99_ms"] for t in tiers]
    xs = range(len(tiers))
    b1 = ax2.bar([x - 0.2 for x in xs], p50, 0.4, label="p50", color="#7f7f7f")
    b2 = ax2.bar([x + 0.2 for x in xs], p99, 0.4, label="p99", color="#2ca02c")
    ax2.bar_label(b1, fmt="%.1f", fontsize=8)
    ax2.bar_label(b2, fmt="%.1f", fontsize=8)
    ax2.set_xticks(list(xs), ["device", "host", "cold (disk)"])
    ax2.set_ylabel("time to first token, ms (idle server)")
    ax2.set_title("TTFT by the adapter's tier", fontsize=9)
    ax2.legend()
    adm = report["admin"]
    names = ["/admin/\nadapters", "/admin/\nmetrics", "/admin/metrics\n(after traffic)",
             "/metrics\n(after traffic)", "/v1/\nmodels"]
    keys = ["adapters", "metrics", "metrics_after_traffic", "public_metrics_after_traffic",
            "models"]
    names = [n for n, k in zip(names, keys, strict=True) if k in adm]
    keys = [k for k in keys if k in adm]
    vals = [adm[k]["p50_ms"] for k in keys]
    bars = ax3.bar(range(len(keys)), vals, color="#9467bd")
    ax3.bar_label(bars, fmt="%.1f")
    ax3.set_xticks(range(len(keys)), names, fontsize=7)
    ax3.set_ylabel("p50 latency of a GET, ms")
    reg = report["registration"]
    ax3.set_title(f"Admin API with {reg['adapters']} adapters (registration: "
                  f"{reg['wall_s']:.1f} s, p50 PUT {reg['put_p50_ms']:.1f} ms)", fontsize=9)
    fig.suptitle(f"One pod, {reg['adapters']} registered adapters, "
                 f"{report['settings']['device_slots']} device slots — tiny Llama fp32, "
                 f"{report['machine']['model']} ({report['machine']['cpus']} CPUs)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--few", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--device-slots", type=int, default=64)
    parser.add_argument("--host-fraction", type=float, default=0.5,
                        help="the host cache holds about this share of the adapters")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each workload")
    parser.add_argument("--ttft-samples", type=int, default=15)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "many_tenants.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" / "many_tenants.png")
    parser.add_argument("--plot-only", action="store_true", help="re-plot --out")
    parser.add_argument("--log-dir", type=Path, default=HERE / ".cache" / "logs")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.plot)
        return
    started = time.perf_counter()
    t0 = time.perf_counter()
    model, dirs, nbytes = build(args.tenants)
    built_s = time.perf_counter() - t0
    host_bytes = int(nbytes * args.tenants * args.host_fraction)
    print(f"{len(dirs)} adapters of {nbytes} bytes ready in {built_s:.1f}s; host cache "
          f"{host_bytes} bytes", flush=True)
    proc = serve(model, args, host_bytes)
    report: dict[str, Any] = {
        "benchmark": "bench_many_tenants",
        "started_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "server_argv": proc.proc.args,
        "git": subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip(),
        "git_dirty": bool(subprocess.run(["git", "status", "--porcelain", "--", "inference"],
                                         cwd=REPO, capture_output=True, text=True).stdout),
        "machine": {**cpu_facts(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "adapter_bytes": nbytes, "host_cache_bytes": host_bytes,
    }
    report["settings"]["model"] = "tiny Llama (tests/factories.py), fp32"
    report["settings"]["adapters"] = f"rank {RANK}, {','.join(TARGETS)}"
    try:
        sync = httpx.Client(base_url=proc.url, timeout=120)
        reg = register(sync, dirs)
        print(f"registration: {reg}", flush=True)
        report["registration"] = reg
        admin = {"adapters": timed_get(sync, "/admin/adapters", 20),
                 "metrics": timed_get(sync, "/admin/metrics", 20),
                 "models": timed_get(sync, "/v1/models", 20)}
        print(f"admin: {admin}", flush=True)
        report["ttft"] = ttft_by_tier(proc.url, sync, args.ttft_samples, args.seed)
        print(f"ttft: { {k: (v['p50_ms'], v['p99_ms']) for k, v in report['ttft'].items()} }",
              flush=True)
        few = [f"t{i}" for i in range(args.few)]
        many = [f"t{i}" for i in range(args.tenants)]
        server = psutil.Process(proc.proc.pid)
        # Warm-up: one request per client of each workload, not measured.
        for tenants in (few, many):
            asyncio.run(closed_loop(proc.url, tenants, args.clients, 1, 4, args.seed + 99))
        rounds: dict[str, list[dict[str, Any]]] = {"few": [], "many": []}
        for r in range(args.rounds):
            order = ("few", "many") if r % 2 == 0 else ("many", "few")
            for key in order:
                tenants = few if key == "few" else many
                row = measure(proc.url, sync, server, tenants, args, args.seed + r)
                rounds[key].append(row)
                print(f"round {r} {key}: {row}", flush=True)
        admin["metrics_after_traffic"] = timed_get(sync, "/admin/metrics", 20)
        admin["public_metrics_after_traffic"] = timed_get(sync, "/metrics", 20)
        admin["adapters_after_traffic"] = timed_get(sync, "/admin/adapters", 20)
        series = sync.get("/admin/metrics").text.count("loramux_requests_total{")
        admin["metrics_after_traffic"]["request_series"] = series
        report["admin"] = admin

        def median(rows: list[dict[str, Any]]) -> dict[str, Any]:
            return sorted(rows, key=lambda x: x["tokens_per_s"])[(len(rows) - 1) // 2]

        fm, mm = median(rounds["few"]), median(rounds["many"])
        ratio = mm["tokens_per_s"] / fm["tokens_per_s"]
        cpu = {k: statistics.median(r["server_cpu_ms_per_token"] for r in rounds[k])
               for k in rounds}
        report["server_cpu_ms_per_token_median"] = cpu
        # Less sensitive to other processes than wall time: the server's own CPU per token.
        report["cpu_ratio_few_over_many"] = round(cpu["few"] / cpu["many"], 3)
        report["throughput"] = {"few": fm, "many": mm, "few_rounds": rounds["few"],
                                "many_rounds": rounds["many"], "ratio": round(ratio, 3),
                                "required_ratio": REQUIRED_RATIO,
                                "meets_target": ratio >= REQUIRED_RATIO}
        bad = sync.get("/admin/adapters").json()
        report["final_residency"] = {
            tier: sum(1 for a in bad["adapters"] if a["residency"] == tier)
            for tier in ("device", "host", "disk")}
        report["failed_adapters"] = sum(1 for a in bad["adapters"] if a["state"] != "ready")
    finally:
        proc.stop()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    tp = report["throughput"]
    print(f"throughput: {tp['few']['tokens_per_s']} tok/s over {args.few} tenants, "
          f"{tp['many']['tokens_per_s']} over {args.tenants}: {tp['ratio']:.2f}x "
          f"({'meets' if tp['meets_target'] else 'DOES NOT meet'} >= {REQUIRED_RATIO}); "
          f"server CPU per token, 8 over 1000 tenants: {report['cpu_ratio_few_over_many']}")
    print(f"wrote {args.out} in {report['wall_s']}s")
    plot(report, args.plot)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
