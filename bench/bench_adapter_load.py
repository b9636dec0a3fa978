"""Micro-benchmark: how long an adapter takes to reach each tier of the cache.

In-process, on the NF4 SmolLM2-135M base with loramux's own code paths:

- disk -> host:   ``read_adapter`` (read adapter_config.json + safetensors, validate every
                  tensor's name, shape and finiteness);
- host -> device: ``backend.add`` for each LoRA backend: ``batched`` (the server's default,
                  ``BatchedLoraBackend``: copy the pairs into per-layer stacks) and ``peft``
                  (``PeftMixedBatchBackend``: PEFT builds and injects LoRA modules); the slot
                  is removed again, untimed, between repeats;
- disk -> device: both, back to back, timed as one operation.

"disk" is measured twice: "warm" (the file is in the OS page cache, the usual case right
after the adapter-sync sidecar wrote it) and "cold" (the file's pages are dropped with
``posix_fadvise(DONTNEED)`` before each read; the VM's virtual disk may still cache below).

On a CPU-only machine the "device" is host RAM as well: host -> device is the cost of the
backend's bookkeeping and a RAM-to-RAM copy, not a PCIe transfer.

    .venv/bin/python bench/bench_adapter_load.py --repeats 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_adapters import (  # noqa: E402
    ALL_LINEAR,
    ATTENTION,
    DEFAULT_CACHE,
    make_adapters,
    tenant_adapters,
)

RANKS = (8, 16, 64)
TARGET_SETS = {"qkvo": ATTENTION, "all-linear": ALL_LINEAR}


def drop_page_cache(directory: Path) -> None:
    for f in directory.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def stats(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[8] if len(ms) > 1 else ms[0]
    return {"median_ms": round(statistics.median(ms), 3), "p90_ms": round(p90, 3),
            "min_ms": round(ms[0], 3), "max_ms": round(ms[-1], 3), "n": len(ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--resident", type=int, default=8,
                        help="other tenants' adapters kept in the model meanwhile (default 8)")
    parser.add_argument("--backends", default="batched,peft",
                        help="comma-separated: batched (the server's default), peft")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "adapter_load.json")
    args = parser.parse_args()
    if args.repeats < 10:
        parser.error("--repeats must be at least 10")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or set(backends) - {"batched", "peft"}:
        parser.error("--backends takes batched and/or peft")

    import torch

    from loramux.inference import lora_backend
    from loramux.inference.adapters import BaseFacts, read_adapter
    from loramux.inference.model_loader import load_base_model

    torch.set_grad_enabled(False)
    specs = [(DEFAULT_CACHE / "load" / f"r{rank}-{name}", rank, targets, 7 + rank)
             for rank in RANKS for name, targets in TARGET_SETS.items()]
    make_adapters(specs)
    residents = tenant_adapters(args.resident) if args.resident else {}

    # disk -> host does not depend on the backend: read_adapter only needs the base's facts.
    base = load_base_model(None, "nf4", "cpu")
    facts = BaseFacts.from_model(base.model, base.aliases)
    rows: list[dict[str, Any]] = []
    for path, rank, targets, _seed in specs:
        host = read_adapter(path, facts, max_rank=64)  # also pulls the file into the cache
        warm: list[float] = []
        cold: list[float] = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            read_adapter(path, facts, max_rank=64)
            warm.append(time.perf_counter() - t)
            drop_page_cache(path)
            t = time.perf_counter()
            read_adapter(path, facts, max_rank=64)
            cold.append(time.perf_counter() - t)
        rows.append({
            "rank": rank, "targets": path.name.split("-", 1)[1],
            "target_modules": list(targets), "lora_modules": len(host.modules),
            "bytes": host.nbytes, "dtype": str(next(iter(host.tensors.values())).dtype),
            "disk_to_host_warm": stats(warm), "disk_to_host_cold": stats(cold),
            "backends": {},
        })
    print("disk -> host done", flush=True)

    for backend_name in backends:
        if backend_name != backends[0]:
            base = load_base_model(None, "nf4", "cpu")  # the batched backend rewires layers
        facts = BaseFacts.from_model(base.model, base.aliases)
        backend = (lora_backend.BatchedLoraBackend(base.model) if backend_name == "batched"
                   else lora_backend.PeftMixedBatchBackend(base.model))
        for i, path in enumerate(residents.values()):
            backend.add(f"resident{i}", read_adapter(path, facts, max_rank=64))
        # The first add of a process may build structures (PEFT wraps the model); warm up.
        backend.add("warmup", read_adapter(specs[0][0], facts, max_rank=64))
        backend.remove("warmup")
        for row, (path, _rank, _targets, _seed) in zip(rows, specs, strict=True):
            host = read_adapter(path, facts, max_rank=64)
            samples: dict[str, list[float]] = {
                k: [] for k in ("host_to_device", "disk_to_device_warm", "disk_to_device_cold")}
            for i in range(args.repeats):
                slot = f"bench{i}"
                t = time.perf_counter()
                backend.add(slot, host)
                samples["host_to_device"].append(time.perf_counter() - t)
                backend.remove(slot)

                t = time.perf_counter()
                backend.add(slot, read_adapter(path, facts, max_rank=64))
                samples["disk_to_device_warm"].append(time.perf_counter() - t)
                backend.remove(slot)

                drop_page_cache(path)
                t = time.perf_counter()
                backend.add(slot, read_adapter(path, facts, max_rank=64))
                samples["disk_to_device_cold"].append(time.perf_counter() - t)
                backend.remove(slot)
            result: dict[str, Any] = {k: stats(v) for k, v in samples.items()}
            h2d = result["host_to_device"]["median_ms"]
            for kind in ("warm", "cold"):
                result[f"ratio_disk_to_device_over_host_to_device_{kind}"] = round(
                    result[f"disk_to_device_{kind}"]["median_ms"] / h2d, 2)
            row["backends"][backend_name] = result
        print(f"{backend_name} backend done", flush=True)

    import bitsandbytes
    import peft
    import transformers

    report = {
        "benchmark": "bench_adapter_load",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent,
                                     capture_output=True, text=True).stdout.strip() or None,
        "base": f"{base.name} ({base.quantization}, {base.device})",
        "device_note": "CPU-only machine: the 'device' tier is host RAM too (no PCIe copy)",
        "cold_note": "cold = posix_fadvise(DONTNEED) on the adapter files before each read; "
                     "the VM's virtual disk may still serve from a host-side cache",
        "repeats": args.repeats,
        "resident_adapters": args.resident,
        "backends": backends,
        "torch_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    def cell(d: dict[str, float]) -> str:
        return f"{d['median_ms']:7.2f} / {d['p90_ms']:7.2f}"

    print()
    print("median / p90 in ms; d2d/h2d = disk->device (warm) over host->device, medians")
    head = (f"{'rank':>4} {'targets':11} {'MiB':>6} {'backend':8} | {'disk->host':>17} "
            f"{'(cold)':>17} | {'host->device':>17} | {'disk->device':>17} | {'d2d/h2d':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for name, b in r["backends"].items():
            print(f"{r['rank']:>4} {r['targets']:11} {r['bytes'] / 2**20:6.2f} {name:8} | "
                  f"{cell(r['disk_to_host_warm'])} {cell(r['disk_to_host_cold'])} | "
                  f"{cell(b['host_to_device'])} | {cell(b['disk_to_device_warm'])} | "
                  f"{b['ratio_disk_to_device_over_host_to_device_warm']:7.2f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
