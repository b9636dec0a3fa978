"""Noisy neighbour: a light tenant's time to first token while a heavy tenant floods the
server, with FIFO admission and with token-fair admission (issue 16).

Tenant A queues ``--ratio`` (20) times as many requests as tenant B, all at once, each with
a long output (``--a-tokens``); B sends its requests one at a time on a fixed, seeded
schedule while A's flood is queued. Reported for B: p50/p99 time to first token (the first
streamed token, measured by the client) and its throughput, in three runs:

  alone  B's schedule on an idle server (``--admission fair``)
  fifo   A + B, ``--admission fifo`` (arrival order: the old behaviour)
  fair   A + B, ``--admission fair`` (the default: least weighted token service first)

and the total throughput (A + B completion tokens over the wall time) of fifo and fair.

The bound (inference/fairness.py): while A and B are both backlogged, their weighted
services (prompt tokens x prompt_token_cost + generated tokens x output_token_cost) differ
by at most U_A + U_B, U = c_p * P + c_o * B * N (P the largest prompt, N the largest output,
B max_batch_size). It is measured here from the client's view of every streamed token: over
each interval in which B had a request waiting (so B was backlogged; A's flood is
backlogged until its last request is admitted), the largest swing of S_A - S_B.

Model: the 2-layer tiny Llama of tests/factories.py (random weights, the real SmolLM2
tokenizer) with two random LoRA adapters, fp32. The experiment is about admission order,
not model speed: the tiny model lets A's flood be 20x B with long outputs and still keep
the whole run within a few minutes on a 2-core CPU (SmolLM2-135M decodes ~20x slower here).

    .venv/bin/python bench/bench_noisy_neighbour.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))

from procs import LoramuxProc, cpu_facts  # noqa: E402

CACHE = HERE / ".cache" / "noisy"
PROMPT_A = "Write a very long report on every clause of the lease, one after the other."
PROMPT_B = "Answer briefly: what is due today?"


def build_models() -> tuple[Path, Path, Path]:
    """The tiny model and the two tenants' adapters (cached in bench/.cache/noisy)."""
    from factories import make_adapter, make_tiny_model
    from loramux.inference.model_loader import ensure_default_model

    model = CACHE / "tiny-llama"
    if not (model / "config.json").is_file():
        make_tiny_model(model, ensure_default_model())
    adapters = []
    for seed, tenant in enumerate(("tenant-a", "tenant-b"), start=1):
        out = CACHE / "adapters" / tenant / "v1"
        if not (out / "adapter_model.safetensors").is_file():
            make_adapter(model, out, rank=8, targets=["q_proj", "v_proj"], seed=seed)
        adapters.append(out)
    return model, adapters[0], adapters[1]


def percentile(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


async def stream_one(client: httpx.AsyncClient, tenant: str, prompt: str, tokens: int,
                     t0: float) -> dict[str, Any]:
    """One streamed /generate: send time, token arrival times, usage (times from t0)."""
    body = {"tenant_id": tenant, "prompt": prompt, "max_new_tokens": tokens,
            "ignore_eos": True, "stream": True}
    sent = time.perf_counter() - t0
    arrivals: list[float] = []
    usage: dict[str, int] = {}
    async with client.stream("POST", "/generate", json=body) as response:
        if response.status_code != 200:
            return {"tenant": tenant, "sent": sent, "status": response.status_code,
                    "error": (await response.aread()).decode()[:300]}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            now = time.perf_counter() - t0
            if "text" in event:
                arrivals.append(now)
            elif "usage" in event:
                usage = event["usage"]
                if not arrivals:  # every token's text held back until the end
                    arrivals.append(now)
            elif "error" in event:
                return {"tenant": tenant, "sent": sent, "status": 200, "error": str(event)}
    done = time.perf_counter() - t0
    return {"tenant": tenant, "sent": sent, "status": 200, "first": arrivals[0],
            "arrivals": arrivals, "done": done, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]}


async def workload(url: str, args: argparse.Namespace, with_a: bool,
                   label: str) -> dict[str, Any]:
    rng = random.Random(args.seed)
    b_count = args.b_requests
    # B's schedule: seeded jitter around a fixed interval, the same in every run.
    b_at = [args.b_start + i * args.b_interval + rng.uniform(0, args.b_interval / 2)
            for i in range(b_count)]
    a_count = args.ratio * b_count if with_a else 0
    limits = httpx.Limits(max_connections=a_count + b_count + 8)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        t0 = time.perf_counter()
        progress = {"b": 0, "a": 0}

        async def a_one() -> dict[str, Any]:
            result = await stream_one(client, "tenant-a", PROMPT_A, args.a_tokens, t0)
            progress["a"] += 1
            return result

        async def b_one(at: float) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            result = await stream_one(client, "tenant-b", PROMPT_B, args.b_tokens, t0)
            progress["b"] += 1
            print(f"  [{label}] B {progress['b']}/{b_count}: ttft "
                  f"{result.get('first', float('nan')) - result['sent']:.3f}s "
                  f"(A done {progress['a']}/{a_count})", flush=True)
            return result

        tasks = [asyncio.create_task(a_one()) for _ in range(a_count)]
        tasks += [asyncio.create_task(b_one(at)) for at in b_at]
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    failed = [r for r in results if r["status"] != 200 or "error" in r]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0]}")
    return {"results": results, "wall_s": wall}


def summarise(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    results = run["results"]
    b = [r for r in results if r["tenant"] == "tenant-b"]
    a = [r for r in results if r["tenant"] == "tenant-a"]
    ttft = [r["first"] - r["sent"] for r in b]
    b_span = max(r["done"] for r in b) - min(r["sent"] for r in b)
    b_tokens = sum(r["completion_tokens"] for r in b)
    out: dict[str, Any] = {
        "b_requests": len(b), "a_requests": len(a),
        "b_ttft_p50_s": percentile(ttft, 50), "b_ttft_p99_s": percentile(ttft, 99),
        "b_ttft_max_s": max(ttft), "b_ttft_s": ttft,
        "b_tokens_per_s": b_tokens / b_span,
        "total_tokens": sum(r["completion_tokens"] for r in results),
        "wall_s": run["wall_s"],
        "total_tokens_per_s": sum(r["completion_tokens"] for r in results) / run["wall_s"],
        "b_sent_s": [r["sent"] for r in b],
    }
    if a:
        out.update(service_gap(a, b, args))
    return out


def service_gap(a: list[dict], b: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """The largest swing of S_A - S_B (weighted tokens, from the streamed events) over any
    window in which B had a request waiting and A's flood was still queued."""
    cp, co = args.prompt_token_cost, args.output_token_cost
    events: list[tuple[float, float]] = []  # (time, +cost for A / -cost for B)
    for sign, requests in ((1.0, a), (-1.0, b)):
        for r in requests:
            # the prompt is charged at admission; its first token comes out of that step
            events.append((r["first"], sign * cp * r["prompt_tokens"]))
            events += [(t, sign * co) for t in r["arrivals"]]
    events.sort()
    a_last_admission = max(r["first"] for r in a)  # A is backlogged until then
    windows = sorted((r["sent"], min(r["first"], a_last_admission)) for r in b
                     if r["sent"] < a_last_admission)
    merged: list[list[float]] = []
    for start, end in windows:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    worst = 0.0
    a_admitted_while_waiting = 0
    for start, end in merged:
        level = lo = hi = 0.0
        for t, cost in events:
            if start <= t < end:  # the first token of B itself ends its wait
                level += cost
                lo, hi = min(lo, level), max(hi, level)
        worst = max(worst, hi - lo)
    for r in b:
        a_admitted_while_waiting = max(a_admitted_while_waiting, sum(
            1 for x in a if r["sent"] <= x["first"] < r["first"]))
    prompt_max = max(r["prompt_tokens"] for r in a + b)
    u = cp * prompt_max + co * args.max_batch_size * max(args.a_tokens, args.b_tokens)
    return {"service_gap_max": worst, "service_gap_bound": 2 * u, "bound_u": u,
            "bound_held": worst <= 2 * u, "windows": len(merged),
            "a_admissions_while_b_waited_max": a_admitted_while_waiting}


def median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median total throughput, with every run's key figures beside it."""
    ranked = sorted(results, key=lambda r: r["total_tokens_per_s"])
    run = dict(ranked[(len(ranked) - 1) // 2])
    for key in ("b_ttft_p50_s", "b_ttft_p99_s", "b_tokens_per_s", "total_tokens_per_s",
                "service_gap_max"):
        if key in run:
            run[f"{key}_all"] = [r[key] for r in results]
    return run


def serve(name: str, model: Path, a: Path, b: Path, admission: str,
          args: argparse.Namespace) -> LoramuxProc:
    flags = ["serve", "--port", "0", "--log-format", "text", "--auth", "none",
             "--model", str(model), "--quantization", "none",
             "--max-batch-size", str(args.max_batch_size), "--max-queue", "1024",
             "--request-timeout-s", str(args.timeout), "--admission", admission,
             "--prompt-token-cost", str(args.prompt_token_cost),
             "--output-token-cost", str(args.output_token_cost),
             "--adapter", f"tenant-a@v1={a}", "--adapter", f"tenant-b@v1={b}"]
    return LoramuxProc(f"noisy-{admission}", flags, args.log_dir)


async def warm_up(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        for tenant in ("tenant-a", "tenant-b"):
            r = await client.post("/generate", json={"tenant_id": tenant, "prompt": "hi",
                                                     "max_new_tokens": 8, "ignore_eos": True})
            r.raise_for_status()


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = ["alone", "fifo", "fair"]
    p50 = [runs[n]["b_ttft_p50_s"] for n in names]
    p99 = [runs[n]["b_ttft_p99_s"] for n in names]
    x = range(len(names))
    left.bar([i - 0.2 for i in x], p50, 0.4, label="p50")
    left.bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    left.set_xticks(list(x), ["B alone", "A+B fifo", "A+B fair"])
    left.set_yscale("log")
    left.set_ylabel("B's time to first token (s, log)")
    left.set_title(f"Light tenant B vs a {report['params']['ratio']}x flood by A")
    for i, (m, n) in enumerate(zip(p50, p99, strict=True)):
        left.annotate(f"{m:.3g}", (i - 0.2, m), ha="center", va="bottom", fontsize=8)
        left.annotate(f"{n:.3g}", (i + 0.2, n), ha="center", va="bottom", fontsize=8)
    left.legend()
    for name, marker in (("fifo", "x"), ("fair", "o"), ("alone", ".")):
        run = runs[name]
        right.plot(run["b_sent_s"], run["b_ttft_s"], marker, label=name)
    right.set_yscale("log")
    right.set_xlabel("B request sent at (s since start)")
    right.set_ylabel("time to first token (s, log)")
    tp = (f"total tokens/s: fifo {runs['fifo']['total_tokens_per_s']:.0f}, "
          f"fair {runs['fair']['total_tokens_per_s']:.0f}")
    right.set_title(tp, fontsize=9)
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot -> {path}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--b-requests", type=int, default=12)
    parser.add_argument("--ratio", type=int, default=20, help="A's requests per B request")
    parser.add_argument("--a-tokens", type=int, default=128, help="A's output (long)")
    parser.add_argument("--b-tokens", type=int, default=32)
    parser.add_argument("--b-start", type=float, default=0.5)
    parser.add_argument("--b-interval", type=float, default=0.5)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--prompt-token-cost", type=float, default=1.0)
    parser.add_argument("--output-token-cost", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3, help="fifo and fair runs each")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "noisy_neighbour.json")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "img" /
                        "noisy_neighbour.png")
    parser.add_argument("--plot-only", action="store_true", help="re-plot --out")
    parser.add_argument("--log-dir", type=Path, default=HERE / ".cache" / "logs")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.plot)
        return

    started = time.perf_counter()
    model, a, b = build_models()
    # Both servers run side by side (an idle one costs nothing) and the fifo and fair runs
    # alternate, so that a neighbour's load on this shared machine hits both alike.
    order = ["alone"] + [m for i in range(args.reps)
                         for m in (("fifo", "fair") if i % 2 == 0 else ("fair", "fifo"))]
    every: dict[str, list[dict[str, Any]]] = {"alone": [], "fifo": [], "fair": []}
    servers: dict[str, LoramuxProc] = {}
    try:
        for admission in ("fair", "fifo"):
            print(f"starting a server with --admission {admission}", flush=True)
            servers[admission] = serve(admission, model, a, b, admission, args)
            asyncio.run(warm_up(servers[admission].url))
        for i, name in enumerate(order, start=1):
            print(f"run {i}/{len(order)}: {name}", flush=True)
            url = servers["fair" if name == "alone" else name].url
            raw = asyncio.run(workload(url, args, with_a=name != "alone", label=name))
            every[name].append(summarise(raw, args))
            brief = {k: v for k, v in every[name][-1].items() if not isinstance(v, list)}
            print(f"  {name}: {json.dumps(brief)}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    runs = {name: median_run(results) for name, results in every.items()}
    report = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {**cpu_facts(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": "tiny 2-layer Llama (tests/factories.make_tiny_model), fp32, 2 LoRA r=8",
        "runs": runs,
        "every_run": every,
        "fair_vs_fifo_total_throughput": (runs["fair"]["total_tokens_per_s"]
                                          / runs["fifo"]["total_tokens_per_s"]),
        "seconds": time.perf_counter() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results -> {args.out}", flush=True)
    plot(report, args.plot)
    for name in ("alone", "fifo", "fair"):
        run = runs[name]
        print(f"{name:5s}  B ttft p50 {run['b_ttft_p50_s']:.3f}s p99 {run['b_ttft_p99_s']:.3f}s"
              f"  B {run['b_tokens_per_s']:.1f} tok/s  total {run['total_tokens_per_s']:.0f} "
              f"tok/s" + (f"  gap {run['service_gap_max']:.0f} / bound "
                          f"{run['service_gap_bound']:.0f}" if "service_gap_max" in run else ""))
    print(f"fair/fifo total throughput: {report['fair_vs_fifo_total_throughput']:.3f}; "
          f"{report['seconds']:.0f}s in all")


if __name__ == "__main__":
    main()
