"""Open-loop overload with and without a bound on the wait for a row (``--max-queue-wait-s``).

Two loramux servers that differ only in ``--max-queue-wait-s`` (none, and ``--bound``
seconds) are up side by side with the suite's 100 rank-16 tenants; each run drives one of
them with the suite's skewed open loop (Zipf popularity, Poisson arrivals, input and output
lengths drawn from [8, 256], the same seed for both) at one offered rate, the runs
interleaved and repeated. Reported per run, over every request sent:

- served: finished requests, their tokens/s, and their p50/p99 time to first token;
- shed: requests refused with 429 (``overloaded``), which a router or client would retry
  elsewhere at once: at submission (the HTTP status), or, for a stream already started,
  after waiting past the bound (the stream's error event, status 429);
- on time: requests whose first token came within ``--slo`` seconds, per second of arrivals
  (goodput), and their share of all requests sent.

Needs the suite's adapters (built if missing, as ``bench/suite.py`` does).

    .venv/bin/python bench/bench_queue_wait.py --rates 0.5,1.0,1.5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import suite
from workloads import open_loop_plan, percentile

HERE = Path(__file__).resolve().parent


def run_once(system: suite.System, prompts: suite.Prompts, names: list[str], rate: float,
             args: argparse.Namespace) -> dict:
    plan = open_loop_plan(rate, args.duration, len(names), 1.0, (8, 256), args.seed)
    records, elapsed = asyncio.run(suite.open_loop(system, plan, names, prompts,
                                                   args.duration, args.grace))
    served = [r for r in records if r.ok]
    # a 429 at submission is the HTTP status; one for a stream that already started (shed
    # after waiting past the bound) comes as the stream's error event, status 429
    shed = [r for r in records if r.error is not None and (
        r.error.startswith("HTTP 429") or "'status': 429" in r.error)]
    other = [r for r in records if not r.ok and r not in shed]
    ttfts = [r.ttft_s for r in served if r.ttft_s is not None]
    on_time = [t for t in ttfts if t <= args.slo]
    return {
        "rate": rate, "sent": len(records), "served": len(served), "shed": len(shed),
        "failed_or_cut": len(other), "elapsed_s": round(elapsed, 1),
        "served_tokens_per_s": round(sum(r.completion_tokens for r in served) / elapsed, 1),
        "p50_ttft_s": percentile(ttfts, 50), "p99_ttft_s": percentile(ttfts, 99),
        "on_time_per_s": round(len(on_time) / args.duration, 3),
        "on_time_share": round(len(on_time) / len(records), 3) if records else None,
        "other_errors": sorted({(r.error or "cut off")[:120] for r in other})[:3],
        "shed_samples": sorted({(r.error or "")[:160] for r in shed})[:2],
        "loadavg": suite.loadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rates", default="0.5,1.0,1.5", help="offered requests/s")
    p.add_argument("--bound", type=float, default=2.0, help="--max-queue-wait-s, seconds")
    p.add_argument("--slo", type=float, default=2.0, help="time to first token SLO, seconds")
    p.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals")
    p.add_argument("--grace", type=float, default=60.0, help="seconds to finish after them")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=18)
    p.add_argument("--out", type=Path, default=HERE / "results" / "queue_wait.json")
    args = p.parse_args()

    from loramux.inference.model_loader import ensure_default_model

    prompts = suite.Prompts(ensure_default_model())
    names = [f"s{i}" for i in range(100)]
    adapters = suite.build_adapters({n: (16, 1800 + i) for i, n in enumerate(names)})
    server_args = SimpleNamespace(log_dir=HERE / ".cache" / "logs" / "queue_wait",
                                  startup_timeout=900)
    variants = {"no bound": [], f"bound {args.bound:g}s": ["--max-queue-wait-s",
                                                          str(args.bound)]}
    rates = [float(r) for r in args.rates.split(",")]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    with contextlib.ExitStack() as stack:
        systems = {v: stack.enter_context(suite.local_server(
            f"qw{i}", suite.loramux_argv(adapters, extra), server_args, "openai"))
            for i, (v, extra) in enumerate(variants.items())}
        for rep in range(args.repeats):
            for rate in rates:
                order = list(variants) if rep % 2 == 0 else list(reversed(variants))
                for v in order:
                    r = run_once(systems[v], prompts, names, rate, args)
                    r["repeat"] = rep
                    results[v].append(r)
                    print(f"{v:>10} rate {rate}/s: sent {r['sent']}, served {r['served']} "
                          f"({r['served_tokens_per_s']} tok/s), shed {r['shed']}, failed/cut "
                          f"{r['failed_or_cut']}, TTFT p50/p99 {suite.fmt_s(r['p50_ttft_s'])}/"
                          f"{suite.fmt_s(r['p99_ttft_s'])} s, on time {r['on_time_per_s']}/s "
                          f"({r['on_time_share']})", flush=True)
                    suite.wait_idle(systems[v])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu": suite.cpu_facts(), "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
