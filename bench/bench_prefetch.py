"""Prefetching waiting requests' adapters: on against off, where requests wait and adapters
come from disk.

The suite's churn workload cannot show what prefetch does: its 8 clients never fill the 16
rows, so no request waits, and its host tier holds all 200 adapters. Here two loramux
servers differ only in ``--no-prefetch-adapters``. Each has ``--max-batch-size`` rows
(fewer than the clients, so requests queue), ``--device-adapter-slots`` device slots and a
host tier of ``--host-mib`` MiB (a few adapters: most requests read theirs from disk). The
clients run closed loop over all 200 rank-8 churn adapters, uniform. The servers are up
side by side, one driven at a time, the runs interleaved. Reported per run: throughput and
time to first token (p50/p99). Needs the suite's churn adapters (built if missing).

    .venv/bin/python bench/bench_prefetch.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import suite
from workloads import summarize, uniform_tenants

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--device-slots", type=int, default=16)
    p.add_argument("--host-mib", type=int, default=32)
    p.add_argument("--requests", type=int, default=144)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "prefetch_queued.json")
    args = p.parse_args()

    from loramux.inference.model_loader import ensure_default_model

    prompts = suite.Prompts(ensure_default_model())
    names = [f"c{i}" for i in range(200)]
    adapters = suite.build_adapters({n: (8, 3800 + i) for i, n in enumerate(names)})
    prompt = prompts.of_length(32, 1)
    server_args = SimpleNamespace(log_dir=HERE / ".cache" / "logs" / "prefetch",
                                  startup_timeout=900)
    common = ["--max-batch-size", str(args.max_batch_size),
              "--device-adapter-slots", str(args.device_slots),
              "--host-cache-bytes", str(args.host_mib * 2**20)]
    configs = {"prefetch on": common, "prefetch off": [*common, "--no-prefetch-adapters"]}
    results: dict[str, list[dict]] = {k: [] for k in configs}
    with contextlib.ExitStack() as stack:
        systems = {k: stack.enter_context(suite.local_server(
            k.replace(" ", "-"), suite.loramux_argv(adapters, flags), server_args, "openai"))
            for k, flags in configs.items()}
        keys = list(configs)
        for rep in range(args.repeats):
            for key in keys[rep % 2:] + keys[:rep % 2]:
                draws = [names[i] for i in uniform_tenants(args.requests, len(names),
                                                           f"prefetch:{rep}")]
                records, wall = asyncio.run(suite.closed_loop(
                    systems[key], [draws] * args.clients, [prompt], args.requests,
                    args.tokens))
                r = summarize(records, wall).to_dict()
                r["loadavg"] = suite.loadavg()
                results[key].append(r)
                print(f"{key}: {r['tokens_per_s']:.1f} tok/s, TTFT p50/p99 "
                      f"{suite.fmt_s(r['p50_ttft_s'])}/{suite.fmt_s(r['p99_ttft_s'])} s, "
                      f"latency p50 {suite.fmt_s(r['p50_latency_s'])} s, failed "
                      f"{r['failed']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu": suite.cpu_facts(), "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
