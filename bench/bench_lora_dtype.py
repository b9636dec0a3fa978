"""LoRA stacks in fp32 against the compute dtype, served side by side with the base alone.

Three real servers on loopback, up together: ``loramux serve --lora-dtype fp32``,
``loramux serve --lora-dtype compute`` (both with the suite's adapters, its 32 rank-16
tenants and its mixed-rank ones warmed, as in ``bench/suite.py``) and the base alone.
For each B, every (server, workload) pair runs one closed-loop wave of max(8, B) requests
of 32 tokens per repetition, the order rotated each time; medians over repetitions, and
ratios to the base's median. Interleaving is what makes the ratios worth reading on a VM
whose speed drifts by tens of percent over minutes.

    .venv/bin/python bench/bench_lora_dtype.py [--repeats 5] [--bs 8,16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import suite  # noqa: E402
from bench_server import git_state  # noqa: E402
from procs import cpu_facts  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bs", default="8,16")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", type=Path, default=HERE / "results" / "lora_dtype.json")
    args = p.parse_args(argv)
    suite_args = suite.parse_args(["--no-docs"])

    specs = {f"s{i}": (16, 1800 + i) for i in range(100)}
    mixed = [n for c in suite.mixed_configs(8).values() for n, _ in c]
    for clients in suite.mixed_configs(8).values():
        for name, rank in clients:
            specs[name] = (rank, 2800 + rank * 100 + int(name.split("-")[1]))
    adapters = suite.build_adapters(specs)
    warm = list(dict.fromkeys([f"s{i}" for i in range(32)] + mixed))
    results: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for key in ("fp32", "compute"):
            servers[key] = stack.enter_context(suite.local_server(
                key, suite.loramux_argv(adapters, ["--lora-dtype", key]), suite_args, "openai"))
        base = stack.enter_context(suite.local_server(
            "base", suite.loramux_argv({}, []), suite_args, "openai"))
        base.base_model = suite.base_model_name(base.url)
        for server in servers.values():
            suite.warm_up(server, warm)
        suite.warm_up(base, [None])
        plan = [(k, w) for w in ("distinct", "identical") for k in servers] + [("base", "base")]
        for b in (int(x) for x in args.bs.split(",")):
            for rep in range(args.repeats):
                k = rep % len(plan)
                for key, workload in plan[k:] + plan[:k]:
                    system = base if key == "base" else servers[key]
                    tenants: list[str | None] = (
                        [f"s{i}" for i in range(b)] if workload == "distinct"
                        else [None if key == "base" else "s0"] * b)
                    records, wall = asyncio.run(suite.closed_loop(
                        system, tenants, suite.DEFAULT_PROMPTS, max(8, b), args.tokens))
                    tps = suite.summarize(records, wall).tokens_per_s
                    results.setdefault(f"B={b}", {}).setdefault(f"{key} {workload}",
                                                                []).append(round(tps, 2))
            row = results[f"B={b}"]
            base_med = statistics.median(row["base base"])
            for name, values in row.items():
                med = statistics.median(values)
                print(f"B={b} {name}: median {med:.1f} tok/s, {med / base_med:.2f} x base "
                      f"(repetitions {values})", flush=True)
    facts = cpu_facts()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "lora_dtype", "command": " ".join(["bench/bench_lora_dtype.py",
                                                        *(argv or sys.argv[1:])]),
        "finished_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git": git_state(), "cpu_model": facts["model"], "cpus": facts["cpus"],
        "tokens": args.tokens, "repeats": args.repeats, "tokens_per_s": results,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
