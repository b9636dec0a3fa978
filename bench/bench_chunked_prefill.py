"""Running streams while long prompts arrive: one-pass prefill against chunked prefill.

loramux servers that differ only in ``--prefill-chunk-tokens`` (0 = one pass) are up side
by side; each run drives one of them while the others idle, the runs interleaved and
repeated. A run: ``--streams`` closed-loop clients, each its own rank-16 tenant, short
prompts and ``--stream-tokens`` new tokens per request, for ``--duration`` seconds; and
every ``--long-every`` seconds one request with a ``--long-prompt``-token prompt
(``--long-tokens`` new tokens, another tenant). Reported: the streams' throughput and
stall (each finished request's longest wait between two tokens, p50/p99 over requests),
and the long requests' time to first token. Needs the suite's adapters (built if
missing, as ``bench/suite.py`` does).

    .venv/bin/python bench/bench_chunked_prefill.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from types import SimpleNamespace

import suite
from workloads import RequestRecord, summarize

HERE = Path(__file__).resolve().parent


async def one_run(system: suite.System, prompts: suite.Prompts, args: argparse.Namespace
                  ) -> dict:
    streams: list[RequestRecord] = []
    longs: list[RequestRecord] = []
    short = prompts.of_length(16)
    long_prompt = prompts.of_length(args.long_prompt)
    async with suite._client(args.streams + 16) as client:
        t0 = time.perf_counter()
        end = t0 + args.duration

        async def stream(i: int) -> None:
            while time.perf_counter() < end:
                rec = RequestRecord(tenant=f"s{i}", sent_s=0.0)
                streams.append(rec)
                await suite.send(client, system, rec.tenant, short, args.stream_tokens, rec, t0)

        async def long_arrivals() -> None:
            tasks = []
            k = 0
            while True:
                at = t0 + 1.0 + k * args.long_every
                if at >= end:
                    break
                await asyncio.sleep(max(0.0, at - time.perf_counter()))
                rec = RequestRecord(tenant=f"s{args.streams + k % 4}", sent_s=0.0)
                longs.append(rec)
                tasks.append(asyncio.create_task(suite.send(
                    client, system, rec.tenant, long_prompt, args.long_tokens, rec, t0)))
                k += 1
            await asyncio.gather(*tasks)

        await asyncio.gather(long_arrivals(), *(stream(i) for i in range(args.streams)))
        wall = time.perf_counter() - t0
    s = summarize(streams, wall).to_dict()
    lg = summarize(longs, wall).to_dict()
    return {"streams_tok_s": s["tokens_per_s"], "streams": len(streams),
            "stall_p50_s": s["p50_max_gap_s"], "stall_p99_s": s["p99_max_gap_s"],
            "stream_latency_p50_s": s["p50_latency_s"],
            "long_requests": len(longs), "long_ttft_p50_s": lg["p50_ttft_s"],
            "long_ttft_p99_s": lg["p99_ttft_s"],
            "failed": s["failed"] + lg["failed"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", default="0,256,512", help="--prefill-chunk-tokens values")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--stream-tokens", type=int, default=64)
    p.add_argument("--long-prompt", type=int, default=1024)
    p.add_argument("--long-tokens", type=int, default=8)
    p.add_argument("--long-every", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "chunked_prefill.json")
    args = p.parse_args()

    from loramux.inference.model_loader import ensure_default_model

    model_dir = ensure_default_model()
    prompts = suite.Prompts(model_dir)
    names = [f"s{i}" for i in range(args.streams + 4)]
    adapters = suite.build_adapters({n: (16, 1800 + i) for i, n in enumerate(names)})
    server_args = SimpleNamespace(log_dir=HERE / ".cache" / "logs" / "chunked",
                                  startup_timeout=900)
    chunks = [int(c) for c in args.chunks.split(",")]
    results: dict[int, list[dict]] = {c: [] for c in chunks}
    with contextlib.ExitStack() as stack:
        systems = {}
        for c in chunks:
            argv = suite.loramux_argv(adapters, ["--prefill-chunk-tokens", str(c)])
            systems[c] = stack.enter_context(
                suite.local_server(f"chunk{c}", argv, server_args, "openai"))
        for rep in range(args.repeats):
            order = chunks[rep % len(chunks):] + chunks[:rep % len(chunks)]
            for c in order:
                r = asyncio.run(one_run(systems[c], prompts, args))
                r["loadavg"] = suite.loadavg()
                results[c].append(r)
                print(f"chunk {c}: streams {r['streams_tok_s']:.1f} tok/s, stall p50/p99 "
                      f"{suite.fmt_s(r['stall_p50_s'])}/{suite.fmt_s(r['stall_p99_s'])} s, "
                      f"long TTFT p50/p99 {suite.fmt_s(r['long_ttft_p50_s'])}/"
                      f"{suite.fmt_s(r['long_ttft_p99_s'])} s ({r['long_requests']} long), "
                      f"failed {r['failed']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpu": suite.cpu_facts(), "results": {str(k): v for k, v in results.items()}},
        indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
